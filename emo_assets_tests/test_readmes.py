"""README.md and results/README.md as a new user reads them: every path and module they name exists, the Python
snippets run on files the pipeline writes, and the Dagster commands target what `make ui` serves."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from emo_assets.core.config import load_settings
from emo_assets.core.paths import activation_dir, model_slug
from emo_assets.extract import main as extract
from emo_assets_tests.conftest import REPO_ROOT

READMES = (REPO_ROOT / "README.md", REPO_ROOT / "results" / "README.md")
TESTS = REPO_ROOT / "emo_assets_tests"
# A path starts at one of the project's committed top-level folders; what follows `*` or `<` is a placeholder.
PATH = re.compile(
    r"(?<![\w./-])((?:emo_assets|emo_assets_tests|data|deploy|benchmarks|docs|scripts|\.dagster_home)/[\w./-]*)"
)
# Test modules named relative to emo_assets_tests/ (the "Guarantees" list), optionally with a test name.
TEST_PATH = re.compile(r"`((?:\w+/)*test_\w+\.py)(?:::(\w+)…?)?`")
MODULE = re.compile(r"(?<![\w./-])(emo_assets(?:\.\w+)+|benchmarks(?:\.\w+)*)(?![\w/-])")
# Dotted names in the READMEs that are values, not modules.
NOT_MODULES = {"emo_assets.activations"}  # the `format` string of an activation file's header


def _text() -> str:
    return "\n".join(readme.read_text(encoding="utf-8") for readme in READMES)


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", READMES[0].read_text(encoding="utf-8"), flags=re.S)


def test_every_project_path_named_exists():
    missing = []
    text = _text()
    for match in PATH.finditer(text):
        path = match.group(1)
        placeholder = text[match.end() : match.end() + 1] in ("*", "<")
        found = any(REPO_ROOT.glob(path + "*")) if placeholder else (REPO_ROOT / path).exists()
        if not found:
            missing.append(path)
    assert not missing, f"named in a README, not in the project: {sorted(set(missing))}"


def test_every_test_named_exists():
    missing = []
    for match in TEST_PATH.finditer(_text()):
        path, test = match.groups()
        file = REPO_ROOT / path if path.startswith("emo_assets_tests/") else TESTS / path
        if not file.is_file():
            missing.append(path)
        elif test and f"def {test}" not in file.read_text(encoding="utf-8"):
            missing.append(f"{path}::{test}")
    assert not missing, f"named in a README, not in emo_assets_tests/: {missing}"
    assert len(TEST_PATH.findall(_text())) >= 15  # the pattern still finds the Guarantees list


def _resolves(dotted: str) -> bool:
    """A module, or an attribute of the longest module prefix (`emo_assets.core.activations.ActivationFile`)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            target = importlib.import_module(module) if cut < len(parts) else None
            for attribute in parts[cut:]:
                if not hasattr(target, attribute):
                    return False
                target = getattr(target, attribute)
            return True
    return False


def test_every_python_module_named_imports():
    names = {m.group(1) for m in MODULE.finditer(_text())} - NOT_MODULES
    assert not [name for name in sorted(names) if not _resolves(name)]
    assert "emo_assets.core.activations.ActivationFile" in names  # the pattern still finds dotted names


def test_the_python_snippets_run_on_files_the_demo_writes(small_datasets, tmp_path, monkeypatch):
    """The demo's layout (`make demo`: offline profile, baseline variant), filled by the extract CLI with a small
    cut of the baseline; the snippets run in that folder as in the project root after `make demo`."""
    snippets = _blocks("python")
    assert snippets
    monkeypatch.setenv("EMO_ASSETS_DATASETS", ",".join(f"{k}={v}" for k, v in small_datasets.items()))
    monkeypatch.chdir(tmp_path)
    assert "minilm" in load_settings({"EMO_ASSETS_ROOT": str(tmp_path)}).models  # in the demo's profile
    output = activation_dir(Path("results"), "baseline", model_slug("minilm"))
    assert extract(["--model", "minilm", "--dataset", str(small_datasets["baseline"]), "--output", str(output)]) == 0
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - the README's own code is what is tested


def _one_command(program: str) -> list[str]:
    """The README's bash command that starts with `program` (continuation lines joined)."""
    commands = [
        line.strip()
        for block in _blocks("bash")
        for line in block.replace("\\\n", " ").splitlines()
        if line.strip().startswith(program)
    ]
    assert len(commands) == 1, commands
    return shlex.split(commands[0].split(" #")[0])


def _dagster_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "deploy" / "local" / "dagster.yaml", home / "dagster.yaml")
    drop = ("EMO_ASSETS_PROFILE", "EMO_ASSETS_MODELS", "EMO_ASSETS_CONFIG", "EMO_ASSETS_EMOTIONS")
    return {
        **{k: v for k, v in os.environ.items() if k not in drop},
        "DAGSTER_HOME": str(home),
        "EMO_ASSETS_RESULTS_DIR": str(tmp_path / "results"),
    }


def test_the_job_launch_example_queues_a_run_in_the_code_location_of_make_ui(tmp_path):
    """`make ui` serves workspace.yaml; a run queued for another location name fails in its daemon."""
    command = _one_command("dagster job launch")
    env = _dagster_env(tmp_path)
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.run(
        [str(dagster), *command[1:]], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    import dagster as dg

    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())
    location = workspace["load_from"][0]["python_module"]["location_name"]
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert location == pyproject["tool"]["dagster"]["code_location_name"]
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = [record.dagster_run for record in instance.get_run_records()]
    assert [(run.job_name, run.status) for run in runs] == [
        (command[command.index("-j") + 1], dg.DagsterRunStatus.QUEUED)
    ]
    assert runs[0].remote_job_origin.location_name == location


def test_the_partition_example_names_a_partition_of_the_default_profile(tmp_path):
    text = READMES[0].read_text(encoding="utf-8")
    asset, partition = re.search(r"--select '([^']+)' --partition '([^']+)'", text).groups()
    script = (
        "import json, dagster as dg; from emo_assets.definitions import build_defs; "
        f"spec = build_defs().get_assets_def(dg.AssetKey.from_user_string({asset!r})).partitions_def; "
        "print(json.dumps([str(key) for key in spec.get_partition_keys()]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=_dagster_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert partition in json.loads(proc.stdout.splitlines()[-1])
