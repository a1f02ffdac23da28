"""Layering: the scheduler, the KV bookkeeping, the planner and the task generators import no torch; no package
imports eval/ or bench/ harness code except the CLI."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

TORCH_FREE = [
    "longfit.config", "longfit.sampling_params", "longfit.outputs", "longfit.kv.block_pool", "longfit.kv.manager",
    "longfit.kv.spec", "longfit.engine.request", "longfit.engine.scheduler", "longfit.plan.planner",
    "longfit.plan.cost_model", "longfit.plan.hardware", "longfit.compression.spec",
    "longfit.compression.head_scores", "longfit.models.model_config",
    "longfit.eval.tasks", "longfit.eval.scorers", "longfit.eval.corpus",
]
ROOT = pathlib.Path(__file__).resolve().parents[2] / "longfit"


def test_torch_free_modules_do_not_load_torch():
    code = "import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE) + (
        "bad = [m for m in ('torch', 'numpy.testing') if m in sys.modules]\nprint(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch" not in result.stdout.split(","), "a torch-free module imported torch"


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_nothing_below_the_cli_imports_bench_or_the_server():
    for path in ROOT.rglob("*.py"):
        package = path.relative_to(ROOT).parts[0]
        if package in ("cli.py", "bench", "server", "eval"):
            continue
        bad = {name for name in _imports(path) if name.startswith(("longfit.bench", "longfit.server"))}
        assert not bad, f"{path} imports {bad}"


# Allowed below the runtime: the raw weight record, and the C kernels' loader (stdlib + torch; the packed layers'
# few-row products are among its kernels).
_LOW_LEVEL = ("longfit.models.weights", "longfit.runtime.native")


def test_compression_and_quant_do_not_import_the_runtime():
    for package in ("compression", "quant"):
        for path in (ROOT / package).rglob("*.py"):
            bad = {n for n in _imports(path) if n.startswith(("longfit.models", "longfit.runtime", "longfit.engine"))
                   and n not in _LOW_LEVEL}
            assert not bad, f"{path} imports {bad}"
