"""Security guarantees: no unpickling anywhere, remote model code off unless configured, UIs bound to localhost.

The source scan is AST-based (comments and strings cannot trigger or hide it) and covers every `.py` file of
`emo_assets/` and `benchmarks/`. `test_scanner_catches_every_pattern` proves the scanner itself sees each
forbidden pattern, so a scan that silently stopped working would fail too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from emo_assets import cli
from emo_assets.core import models
from emo_assets.core.config import load_settings
from emo_assets_tests.conftest import REPO_ROOT

SCANNED = ("emo_assets", "benchmarks")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"}
PICKLE_CALLS = {"to_pickle", "read_pickle"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_patterns(source: str, *, model_loading: bool = True) -> list[str]:
    """`line: what` for every way `source` could unpickle data or load pickle checkpoints.

    `model_loading` also requires `use_safetensors=True` on `*Model*.from_pretrained` calls (the package's
    rule; the benchmarks load directories that `load_model` has already checked to hold safetensors)."""
    tree = ast.parse(source)
    found = []
    torch_load_names = {"torch.load"}  # spellings that call torch.load
    numpy_load_names = {"np.load", "numpy.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{node.lineno}: import {alias.name}")
                if alias.name == "torch" and alias.asname:
                    torch_load_names.add(f"{alias.asname}.load")
                if alias.name == "numpy" and alias.asname:
                    numpy_load_names.add(f"{alias.asname}.load")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if node.module in ("torch", "torch.serialization") and alias.name == "load":
                    torch_load_names.add(alias.asname or "load")
                if node.module == "numpy" and alias.name == "load":
                    numpy_load_names.add(alias.asname or "load")
                if alias.name in PICKLE_CALLS:
                    found.append(f"{node.lineno}: import of {alias.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        attr = node.func.attr if isinstance(node.func, ast.Attribute) else name
        if name in torch_load_names or name == "torch.serialization.load":
            if not _is_true(_keyword(node, "weights_only")):
                found.append(f"{node.lineno}: {name}(...) without weights_only=True")
        if name in numpy_load_names:
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{node.lineno}: {name}(..., allow_pickle={ast.unparse(allow)})")
        if attr in PICKLE_CALLS:
            found.append(f"{node.lineno}: {name}(...)")
        loads_weights = model_loading and attr == "from_pretrained" and "Model" in name
        if loads_weights and not _is_true(_keyword(node, "use_safetensors")):
            found.append(f"{node.lineno}: {name}(...) without use_safetensors=True (may load a pickle checkpoint)")
    return found


def _sources() -> list[Path]:
    files = [p for folder in SCANNED for p in (REPO_ROOT / folder).rglob("*.py")]
    assert len(files) > 20, "the scan found suspiciously few files"
    return sorted(files)


def test_no_pickle_or_unsafe_torch_load_in_the_sources():
    problems = [
        f"{path.relative_to(REPO_ROOT)}:{hit}"
        for path in _sources()
        for hit in unsafe_patterns(
            path.read_text(encoding="utf-8"), model_loading=path.is_relative_to(REPO_ROOT / "emo_assets")
        )
    ]
    assert problems == [], "unsafe deserialisation:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import joblib as jl",
        "from dill import loads",
        "import cloudpickle",
        "import torch\ntorch.load(path)",
        "import torch\ntorch.load(path, weights_only=False)",
        "import torch as t\nt.load(path)",
        "from torch import load\nload(path)",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "import numpy\nnumpy.load(p, allow_pickle=flag)",
        "frame.to_pickle(path)",
        "import pandas as pd\npd.read_pickle(path)",
        "AutoModel.from_pretrained(path)",
        "AutoModel.from_pretrained(path, use_safetensors=False)",
    ],
)
def test_scanner_catches_every_pattern(snippet):
    assert unsafe_patterns(snippet), f"the scanner missed: {snippet!r}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(path, weights_only=True)",
        "import numpy as np\nnp.load(path)",
        "np.load(path, allow_pickle=False)",
        "AutoModel.from_pretrained(path, use_safetensors=True)",
        "AutoTokenizer.from_pretrained(path)",
        "# import pickle\ntext = 'torch.load(x)'",
    ],
)
def test_scanner_accepts_safe_code(snippet):
    assert unsafe_patterns(snippet) == []


# -- trust_remote_code ---------------------------------------------------------------------------------
# The loader side (remote code is not run for a model directory with an auto_map) is tested in
# emo_assets_tests/core/test_models.py::test_remote_code_is_not_run_by_default.


def _settings(tmp_path, **env):
    return load_settings({"EMO_ASSETS_ROOT": str(tmp_path), **env})


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("1", True), ("true", True), ("0", False), ("", False), ("no", False)],
)
def test_trust_remote_code_is_off_unless_configured(tmp_path, value, expected):
    env = {} if value is None else {"EMO_ASSETS_TRUST_REMOTE_CODE": value}
    assert _settings(tmp_path, **env).extraction.trust_remote_code is expected


def test_packaged_configuration_keeps_remote_code_off():
    import tomllib

    from emo_assets.core.config import PACKAGED_CONFIG

    assert tomllib.loads(PACKAGED_CONFIG.read_text())["extraction"]["trust_remote_code"] is False


@pytest.mark.parametrize("value", [None, "1"])
def test_the_configured_loader_passes_the_setting_on(tmp_path, monkeypatch, value):
    """The one loading path of the CLI and the Dagster resource hands the setting to `load_model`."""
    env = {} if value is None else {"EMO_ASSETS_TRUST_REMOTE_CODE": value}
    seen = {}
    monkeypatch.setattr(models, "load_model", lambda model_id, **kwargs: seen.update(kwargs))
    models.load_configured_model("some/model", _settings(tmp_path, **env))
    assert seen["trust_remote_code"] is (value == "1")


# -- network exposure of the UIs -----------------------------------------------------------------------


def test_emo_assets_ui_binds_localhost_by_default(tmp_path, monkeypatch):
    """`emo-assets ui` runs `dagster dev -h 127.0.0.1`; the command is captured instead of executed."""
    monkeypatch.setenv("EMO_ASSETS_ROOT", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.chdir(tmp_path)
    captured = []
    monkeypatch.setattr(cli, "supervise", lambda argv: captured.append(argv) or 0)
    assert cli.main(["ui"]) == 0
    (argv,) = captured
    assert argv[argv.index("-m") + 1 :][:2] == ["dagster", "dev"]
    host = argv[argv.index("-h") + 1] if "-h" in argv else argv[argv.index("--host") + 1]
    assert host == "127.0.0.1"
    assert cli.build_parser().parse_args(["ui"]).host == "127.0.0.1"


def _make_recipe(target: str) -> str:
    text = (REPO_ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M)
    assert match, f"no {target} target in the Makefile"
    return match.group(1)


def test_makefile_uis_bind_localhost():
    ui = _make_recipe("ui")
    assert "emo-assets ui" in ui
    hosts = re.findall(r"(?:-h|--host)[ =](\S+)", ui)
    assert all(h == "127.0.0.1" for h in hosts), ui  # no host given: the CLI's default, 127.0.0.1
    mlflow = _make_recipe("mlflow-ui")
    assert re.search(r"mlflow ui\b.*--host 127\.0\.0\.1\b", mlflow), mlflow
    assert "0.0.0.0" not in (REPO_ROOT / "Makefile").read_text()
