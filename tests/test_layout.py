"""The product apart from the lab: what makes and serves a model imports nothing of ``experiments/``.

``training`` (data, training, export), ``cama``, ``store``, ``app`` and ``worker`` are the
product; ``experiments`` reproduces the paper's evaluations and may import the product, never the
other way round.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("cama", "store", "app", "worker", "training")
TRAINING_MODULES = sorted(p.stem for p in (ROOT / "training").glob("*.py") if p.stem != "__init__")

# imports each module named on the command line in turn and prints, per module, the lab modules
# that importing it brought into sys.modules
PROBE = """
import importlib, json, sys
seen = {}
for name in sys.argv[1:]:
    importlib.import_module("training." + name)
    seen[name] = sorted(m for m in sys.modules if m == "experiments" or m.startswith("experiments."))
print(json.dumps(seen))
"""


def imported_packages(path: Path) -> set[str]:
    """The top-level packages every ``import`` statement of ``path`` names, at any depth (a
    function's lazy import too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_training_module_imports_no_experiments_module() -> None:
    assert len(TRAINING_MODULES) >= 10  # the glob found the package
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *TRAINING_MODULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(seen) == set(TRAINING_MODULES)
    assert {name: mods for name, mods in seen.items() if mods} == {}


def test_no_product_source_names_the_lab_or_the_benchmarks() -> None:
    """Also the imports a command makes only when it runs (inside a function)."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(found)
        for package in PRODUCT
        for path in (ROOT / package).rglob("*.py")
        if (found := imported_packages(path) & {"experiments", "benchmarks", "tests"})
    }
    assert offenders == {}


def test_the_lab_check_would_see_a_lab_import(tmp_path: Path) -> None:
    """The static check reads lazy imports: a function's ``from experiments import ...`` counts."""
    source = tmp_path / "probe.py"
    source.write_text("def main():\n    from experiments.eval_cache import Cache\n    return Cache\n")
    assert "experiments" in imported_packages(source)
