"""Build one-row-per-sentence (positions = sentence_end) activation files of N sentences from a graph run's
all-positions files (each emotion's sentence-end rows repeated with N(0, 0.01^2) noise), then time the analysis
steps in-process and report peak RSS. Usage: PYTHONPATH=. python benchmarks/results/analysis-sentence-end-2026-12-05.py SRC_RESULTS N WORK"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.sentences import synthetic_sentences, write_dataset
from emo_assets.core.activations import ActivationFile, write_activation_file
from emo_assets.core.paths import activation_dir, activation_file

E = ("gratitude", "anger", "apology", "neutral")
src, N, work = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
results = work / "results"
work.mkdir(parents=True, exist_ok=True)
dataset = write_dataset(work / "data.jsonl", N)
ids = {e: [r["id"] for r in synthetic_sentences(N) if r["emotion"] == e] for e in E}
rng = np.random.default_rng(0)
for slug in () if (results / "synthetic").is_dir() else ("minilm", "tiny-gpt2"):
    for e in E:
        full = ActivationFile(activation_file(activation_dir(src, "synthetic", slug), e))
        ends = full.offsets[1:] - 1
        n = len(ids[e])
        reps = -(-n // len(ends))
        arrays = {}
        for kind in full.kinds:
            base = np.asarray(full.mapped(kind)[:, ends])
            tiled = np.tile(base, (1, reps, 1))[:, :n]
            tiled += rng.standard_normal(tiled.shape, dtype=np.float32) * 0.01
            arrays[kind] = tiled
        hdr = full.header
        hdr = dataclasses.replace(hdr, sentence_ids=tuple(ids[e]))
        write_activation_file(
            activation_file(activation_dir(results, "synthetic", slug), e),
            arrays,
            offsets=np.arange(n + 1, dtype=np.int64),
            input_ids=np.tile(full.input_ids[ends], reps)[:n],
            header=hdr,
        )
        del arrays
print("built", flush=True)
code = r"""
import sys, time, json, resource
from pathlib import Path
from emo_assets.core.activations import ActivationFile
from emo_assets.core.paths import activation_dir, activation_file
from emo_assets.core.analysis.inputs import ModelActivations, token_strings
from emo_assets.core.analysis import model_analysis as M
from emo_assets.core.analysis.comparisons import cross_model_alignment_step
E=("gratitude","anger","apology","neutral")
results, dataset, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
def status():
    return {l.split(":")[0]: round(int(l.split()[1])/1024) for l in open("/proc/self/status") if l.startswith(("VmHWM","RssAnon","RssFile"))}
times, models = {}, {}
for slug in ("minilm","tiny-gpt2"):
    files = {}
    for e in E:
        f = ActivationFile(activation_file(activation_dir(results,"synthetic",slug), e)); f.positions = "sentence_end"; files[e] = f
    acts = ModelActivations.from_files("synthetic", slug, files, dataset_path=dataset)
    models[slug] = acts
    for name, f in (("vectors", lambda: M.emotion_vectors_step(acts,out)), ("subspaces", lambda: M.emotion_subspaces_step(acts,out)),
                    ("probes", lambda: M.linear_probes_step(acts,out)), ("tokens", lambda: M.token_vectors_step(acts,out,{},token_strings(acts)))):
        t=time.perf_counter(); r=f(); times[f"{slug}/{name}"]=round(time.perf_counter()-t,2)
        print(slug, name, times[f"{slug}/{name}"], status(), r.summary.get("token_status",""), flush=True)
t=time.perf_counter(); cross_model_alignment_step(models,out,"synthetic"); times["comparisons"]=round(time.perf_counter()-t,2)
print("comparisons", times["comparisons"], status())
print(json.dumps({"times": times, "total_s": round(sum(times.values()),2), **status()}))
"""
subprocess.run([sys.executable, "-c", code, str(results), str(dataset), str(work / "out")])
