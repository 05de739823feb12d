"""Where to hook a transformer: its blocks, and each block's MLP and attention, found without per-model code.

`hidden_states[-1]` of GPT-2 / GPT-NeoX / GPT-Neo is the *final-norm* output, not the last block's output,
so the residual stream is captured by hooking the blocks themselves. The block list is the `ModuleList` whose
length is the config's layer count (`h`, `layers`, `encoder.layer`, `model.layers`, ...), which covers GPT-2,
GPT-NeoX, GPT-Neo, BERT-style encoders and Llama/Qwen/Mistral-style decoders alike. Inside a block the MLP and
attention sub-modules are looked up by the names those families use; for BERT the "MLP output" is the second
dense layer (`output.dense`, before the residual add and LayerNorm), matching what the decoders' `mlp` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative paths inside a block, tried in order.
MLP_PATHS = ("mlp", "feed_forward", "ffn", "output.dense")
ATTENTION_PATHS = ("attn", "self_attn", "attention.output.dense", "attention")


class HookPointError(ValueError):
    """The model's layers could not be found."""


@dataclass(frozen=True)
class HookPoints:
    """Modules to hook, one per layer, and their dotted names (recorded in the activation file)."""

    blocks: list[torch.nn.Module]
    mlps: list[torch.nn.Module]
    attentions: list[torch.nn.Module]
    names: dict[str, list[str]]

    def of_kind(self, kind: str) -> list[torch.nn.Module]:
        """Every layer's module whose output is the activation `kind` (`resid_post`, `mlp_out`, `attn_out`)."""
        return {"resid_post": self.blocks, "mlp_out": self.mlps, "attn_out": self.attentions}[kind]


def _layer_count(config) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    expected = _layer_count(model.config)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected)
    ]
    if not candidates:
        raise HookPointError(f"{type(model).__name__}: no ModuleList of {expected} transformer blocks found")
    return min(candidates, key=lambda item: item[0].count("."))  # the outermost list is the block list


def _submodule(block: torch.nn.Module, paths: tuple[str, ...]) -> tuple[str, torch.nn.Module] | None:
    for path in paths:
        try:
            return path, block.get_submodule(path)
        except AttributeError:
            continue
    return None


def find_hook_points(model: torch.nn.Module) -> HookPoints:
    """Blocks, MLPs and attention modules of `model`, in layer order."""
    prefix, blocks = _find_blocks(model)
    found = {"mlp": [], "attn": []}
    names = {"resid_post": [], "mlp_out": [], "attn_out": []}
    for index, block in enumerate(blocks):
        base = f"{prefix}.{index}"
        names["resid_post"].append(base)
        for kind, paths, key in (("mlp", MLP_PATHS, "mlp_out"), ("attn", ATTENTION_PATHS, "attn_out")):
            hit = _submodule(block, paths)
            if hit is None:
                raise HookPointError(f"{type(model).__name__}: block {base} has none of {paths}")
            found[kind].append(hit[1])
            names[key].append(f"{base}.{hit[0]}")
    return HookPoints(blocks=list(blocks), mlps=found["mlp"], attentions=found["attn"], names=names)


def first_tensor(output) -> torch.Tensor:
    """Block and attention modules return a tensor or a tuple whose first element is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output
