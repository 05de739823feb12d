"""Batched, exact activation extraction with forward hooks, streamed to activation files.

How and why:
* All texts are tokenized first (cheap), so every row's position in the output file is known up front.
* One forward stream per model: `extract_files` takes several output files (e.g. every emotion of a dataset) and
  batches over the union of their sentences, so no file ends in a small batch of its own; each batch's rows go to
  their files (the sentences of one file are adjacent within a batch, so each file gets views, not copies).
* Content-addressed reuse (`emo_assets.core.activations.reuse`): sentences whose token ids already have rows in a
  compatible earlier file (`ExtractionJob.reuse_from`: another variant's file, the previous version of this one)
  are copied, not forwarded; `ExtractionOptions.reuse=False` forwards everything (a byte-identical rerun).
* Batches are right-padded with an attention mask. For causal models right padding is exact (real tokens never
  attend to pads, position ids start at 0 in every row), so a sentence's activations are the same alone or in a
  batch. Padding is found by the mask, never by token id (GPT-2's pad = eos = bos). On the CPU sentences are
  sorted by length first (least padding: compute is the cost); on an accelerator batches keep dataset order
  (padding is cheap there, and each batch's rows are then one contiguous run per layer in the file: writing is
  the cost). `ExtractionOptions.length_sorted` overrides.
* Forward hooks on each block (residual stream after the block), each MLP and, if asked, each attention
  module. `hidden_states` is not used: its last entry is post final-norm.
  The capture is zero-copy on the CPU and gathers on the device elsewhere (`emo_assets.core.capture`).
* Each batch is handed to the `ActivationWriter`, which writes its rows at their dataset-order positions on a
  writer thread (overlapping the next forward), at most one batch behind, so peak memory is two batches,
  whatever the dataset size. Non-finite values are counted (one fp32 sum per tensor; exact count only if the
  sum is not finite).
* Base model, compute dtype as loaded (fp32 default), storage dtype configurable. `ExtractionResult.timings`
  says where the time went.
* What is stored (`ExtractionOptions.positions` / `layers`, see `emo_assets.core.selection`): with every token's
  rows the CPU capture is zero-copy; a subset of positions (or a mean) is gathered by `DeviceCapture` on any
  device. Only the stored layers' modules are hooked.
* Disk cost up front: every writer is built (not entered) before the first write, so the exact bytes of every file
  are known and checked against the free space (`emo_assets.core.activations.diskspace`).
* Shards: a job over the shard bound is cut into runs of sentences, each its own activation file; the k-th shards
  of all jobs form one wave (one forward stream), published before the next wave starts, and each job's manifest
  is written last (`emo_assets.core.activations.shards`). A rerun keeps every published shard that is exactly
  what it would write, so a killed extraction forwards only the sentences of the shards it had not published.

`extract_files` (`run`) runs the parts in order, each in its own module and callable and testable alone: the
options, jobs and results (`options`), planning (`planning.plan_extraction`: checks, tokens, headers), shards and
waves (`shards`), the reuse decision (`reuse.decide_reuse_all`: kept files, copied sentences), writers and the
disk check (`run`), the forward stream (`stream.ForwardStream`: batches, capture, hand-over to the writers; its
device choice is `stream.HOST_DEVICES`), then the manifests (`shards`) and the results (`results`). The parts
share one plan object and one invariant: a batch's rows are adjacent per file, in dataset order.
"""

from emo_assets.core.extraction.options import ExtractionError, ExtractionJob, ExtractionOptions, ExtractionResult
from emo_assets.core.extraction.planning import ExtractionPlan, plan_extraction, tokenize
from emo_assets.core.extraction.reuse import ReuseDecision, decide_reuse, decide_reuse_all
from emo_assets.core.extraction.run import estimate_files, extract_files, extract_to_file
from emo_assets.core.extraction.stream import ForwardStream, length_sorted_batches, plan_batches

__all__ = [
    "ExtractionError",
    "ExtractionJob",
    "ExtractionOptions",
    "ExtractionPlan",
    "ExtractionResult",
    "ForwardStream",
    "ReuseDecision",
    "decide_reuse",
    "decide_reuse_all",
    "estimate_files",
    "extract_files",
    "extract_to_file",
    "length_sorted_batches",
    "plan_batches",
    "plan_extraction",
    "tokenize",
]
