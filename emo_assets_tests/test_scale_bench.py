"""The `scale` row's memory sampler on real process groups: it sums the whole group (a child's child
included), counts anonymous memory apart, and kills the group past its limit; its account of the bytes a run
left on disk."""

import os
import subprocess
import sys
import time

from benchmarks.scale import GroupMemory, disk_bytes, step_seconds

# a parent that starts a child; the child holds 200 MiB of written (so resident, anonymous) memory
HOLDER = (
    "import subprocess, sys; "
    "subprocess.run([sys.executable, '-c', "
    "'import time; b = bytearray(200 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); time.sleep(4)'])"
)


def _group(limit_kib: int) -> tuple[GroupMemory, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], start_new_session=True)
    memory = GroupMemory(proc.pid, limit_kib, interval=0.1)
    memory.start()
    code = proc.wait(timeout=60)
    time.sleep(0.3)
    memory.done.set()
    memory.join()
    return memory, code


def test_peak_of_the_whole_group_and_its_anonymous_part():
    memory, code = _group(limit_kib=20 * 2**20)
    assert code == 0 and not memory.killed
    assert memory.peak_anon_kib >= 200 * 1024  # the grandchild's buffer is counted
    assert memory.peak_kib >= memory.peak_anon_kib


def test_the_group_is_killed_past_its_limit():
    memory, code = _group(limit_kib=100 * 1024)
    assert memory.killed and code == -9


def test_step_seconds_sums_the_runs_of_each_stage():
    runs = {"load_models[minilm]": 2.0, "synthetic_activations": 10.0, "synthetic_analysis": 4.5}
    runs["synthetic_comparisons"] = 1.0
    assert step_seconds(runs) == {
        "datasets": 0.0,
        "activations": 10.0,
        "analysis": 4.5,
        "comparisons": 1.0,
        "other": 2.0,
    }


def test_disk_bytes_counts_activation_files_shards_and_manifests_apart_from_the_rest(tmp_path):
    results = tmp_path / "results"
    model = results / "synthetic" / "activations" / "minilm"
    sizes = {
        model / "activations_anger.safetensors": 10_000,
        model / "activations_joy.safetensors": 300,  # a manifest
        model / "activations_joy.shards" / "shard-00000.safetensors": 70_000,
        model / "activations_joy.shards" / "shard-00001.safetensors": 5_000,
        results / "synthetic" / "analysis" / "minilm" / "vectors.safetensors": 9_000,  # not activations
        results / "mlflow.db": 4_096,
    }
    for path, size in sizes.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    activations = [p for p in sizes if "activations" in p.relative_to(results).parts[1:2]]
    allocated = sum(
        os.stat(os.path.join(root, name)).st_blocks * 512 for root, _, names in os.walk(results) for name in names
    )
    assert disk_bytes(results) == {
        "activation_bytes": sum(os.stat(p).st_size for p in activations),
        "results_allocated_bytes": allocated,
    }
    assert disk_bytes(results)["activation_bytes"] == 85_300
