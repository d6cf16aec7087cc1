"""The package's shape: the core never reaches into the applications (issue #16).

Data flows one way, functional <- layers <- models <- {apps, integrations, cli}, and
``import spatial_attention`` loads the core only. The old top-level paths of the
applications are stubs that forward, with a DeprecationWarning, to ``apps/``.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import spatial_attention

PACKAGE = Path(spatial_attention.__file__).resolve().parent

#: old path -> new home, for the modules that moved under apps/
MOVED = {
    "train": "apps.training",
    "data": "apps.training.data",
    "ema": "apps.training.ema",
    "denoise": "apps.denoise",
    "bench": "apps.bench",
    "flops": "apps.bench.flops",
    "memory": "apps.bench.memory",
    "sort_of_clevr": "apps.sort_of_clevr",
}
#: what runs around the core rather than inside it: the command line, and the stubs,
#: whose whole job is to hand out the applications' names
OUTSIDE_CORE = {"cli.py", "__main__.py", "_moved.py"} | {f"{m}.py" for m in MOVED}


def _core_modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py")
        if "apps" not in p.relative_to(PACKAGE).parts
        and str(p.relative_to(PACKAGE)) not in OUTSIDE_CORE
    )


def _imported(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in ``path`` names, relative ones resolved."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from . import apps` / `from .. import train` name a module in the names
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def _is_application(module: str) -> bool:
    if not module.startswith("spatial_attention."):
        return False
    top = module.split(".")[1]
    return top == "apps" or top in MOVED


def test_the_scan_sees_the_core_and_resolves_relative_imports():
    names = {str(p.relative_to(PACKAGE)) for p in _core_modules()}
    assert {"registry.py", "checks.py", "capture.py", "viz.py", "checkpoint.py",
            "layers/window.py", "models/common.py", "functional/scoring.py"} <= names
    assert not names & OUTSIDE_CORE
    imports = {m for _, m in _imported(PACKAGE / "layers" / "window.py")}
    assert "spatial_attention.functional.scoring" in imports
    assert "spatial_attention.registry" in imports


def test_no_core_module_imports_an_application():
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        for path in _core_modules()
        for line, module in _imported(path)
        if _is_application(module)
    ]
    assert not offenders, "the core imports an application:\n" + "\n".join(offenders)


def test_importing_the_package_loads_the_core_only():
    # torch itself imports tqdm (torch.hub), so what counts is what spatial_attention
    # adds on top of `import torch`
    code = (
        "import sys, json, torch\n"
        "before = set(sys.modules)\n"
        "import spatial_attention\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    added = json.loads(out.stdout.strip().splitlines()[-1])
    forbidden = ("matplotlib", "tqdm", "PIL", "spatial_attention.apps",
                 *(f"spatial_attention.{m}" for m in MOVED))
    loaded = [m for m in added if m.split(".")[0] in forbidden[:3]
              or any(m == f or m.startswith(f + ".") for f in forbidden[3:])]
    assert not loaded, f"import spatial_attention loaded {loaded}"
    assert "spatial_attention.layers" in added  # the check ran on a real import


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_paths_warn_and_forward(old, new):
    stub = importlib.import_module(f"spatial_attention.{old}")
    target = importlib.import_module(f"spatial_attention.{new}")
    name = next(n for n in target.__all__ if not n.startswith("_"))
    with pytest.warns(DeprecationWarning, match=f"spatial_attention.{new}"):
        got = getattr(stub, name)
    assert got is getattr(target, name)
    assert name in dir(stub)
    with pytest.raises(AttributeError, match=f"spatial_attention.{new}"):
        stub.no_such_name  # noqa: B018


def test_old_paths_reach_moved_private_helpers_and_training_state():
    from spatial_attention.apps.denoise import cli as denoise_cli
    from spatial_attention.apps.training import checkpoints, config, reporting

    stubs = [("denoise", "_fits", denoise_cli), ("train", "_parse_model_args", config),
             ("checkpoint", "save_checkpoint", checkpoints),
             ("checkpoint", "write_csv_rows", reporting)]
    for old, name, home in stubs:
        stub = importlib.import_module(f"spatial_attention.{old}")
        with pytest.warns(DeprecationWarning, match=home.__name__):
            assert getattr(stub, name) is getattr(home, name)
    # what stays in the core's checkpoint module is served without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from spatial_attention.checkpoint import check_state_dict, read_weights  # noqa: F401


def test_torchrun_entry_keeps_its_old_path_without_a_warning():
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"}
    for module in ("spatial_attention.train", "spatial_attention.apps.training"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "--resume" in out.stdout and "python -m spatial_attention.train" in out.stdout


def test_functional_exports_what_its_submodules_export():
    import importlib

    import spatial_attention.functional as F

    for sub in ("clustering", "dispatch", "gates", "neighborhood", "permute", "position",
                "sampling", "scoring", "windows"):
        module = importlib.import_module(f"spatial_attention.functional.{sub}")
        public = [n for n in getattr(module, "__all__", []) if n not in
                  ("fused_path_applies", "check_deform_args")]  # internals of one layer
        missing = [n for n in public if n not in F.__all__]
        assert not missing, f"functional/{sub}.py exports {missing}, functional does not"


def test_mechanism_docstrings_are_short_and_carry_no_timings():
    """Docstrings say paper, equation, shapes, cost, deviations; timings go stale, so
    they live in benchmarks/*.md."""
    import inspect
    import re

    import spatial_attention as sa

    timing = re.compile(r"\d+(\.\d+)?\s*(ms|µs|us)\b|\d+(\.\d+)?\s*MiB\b")
    for name in sa.list_mechanisms():
        doc = inspect.getdoc(sa.info(name).cls) or ""
        assert len(doc.splitlines()) <= 28, f"{name}: docstring of {len(doc.splitlines())} lines"
        assert not timing.search(doc), f"{name}: a timing in the docstring: {timing.search(doc)[0]}"
        assert "attn_impl" in doc, f"{name}: the docstring does not say its attn_impl values"
