"""The job the CLI does, written the way a TransformerLens user would: the contender of the CLI row.

`python -m benchmarks.tl_script --model M --dataset D --output DIR [--batch-size 32]`: load M through
TransformerLens (`TransformerBridge.boot_transformers` on the LM-head model), run `run_with_cache` on batches of
sentences in dataset order (right padding + attention mask), keep every layer's `hook_resid_post` and
`hook_mlp_out` for each sentence's real tokens, and save one safetensors file per emotion. Runs as its own
process so that its imports and model load are timed like the CLI's.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tl_script")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import save_file
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.disable(logging.WARNING)  # TransformerLens' notes about the model name
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    bridge = TransformerBridge.boot_transformers(args.model, hf_model=lm, tokenizer=tokenizer, device="cpu")
    n_layers = lm.config.num_hidden_layers
    names = [f"blocks.{layer}.hook_{kind}" for layer in range(n_layers) for kind in ("resid_post", "mlp_out")]
    wanted = set(names)

    by_emotion: dict[str, list[str]] = {}
    for line in args.dataset.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_emotion.setdefault(record["emotion"], []).append(record["text"])
    args.output.mkdir(parents=True, exist_ok=True)
    for emotion, texts in by_emotion.items():
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        with torch.inference_mode():
            for start in range(0, len(texts), args.batch_size):
                encoded = tokenizer(texts[start : start + args.batch_size], padding=True, return_tensors="pt")
                _, cache = bridge.run_with_cache(
                    encoded["input_ids"],
                    attention_mask=encoded["attention_mask"],
                    names_filter=lambda name: name in wanted,
                )
                lengths = encoded["attention_mask"].sum(-1).tolist()
                for name in names:
                    rows[name].extend(cache[name][i, :n] for i, n in enumerate(lengths))
        save_file(
            {name: torch.cat(parts).contiguous() for name, parts in rows.items()},
            args.output / f"activations_{emotion}.safetensors",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
