"""The README's predict and adapt examples, run as written against a real ``python -m app``.

The blocks marked ``<!-- tests/test_readme.py runs this block as written -->`` are run by bash
from a directory that holds what the README's commands name (``model_store/`` and
``docs/examples/digit7.png``); only the service's host and port are substituted. The store holds
the tiny image model under the name ``mnist``, so the run takes seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from harness.processes import ROOT, ServiceProcess
from harness.stores import clone_store, template_store

MARK = "<!-- tests/test_readme.py runs this block as written -->"
README = ROOT / "README.md"
SAMPLE = ROOT / "docs" / "examples" / "digit7.png"
MAX_README_LINES = 150


def marked_blocks(text: str) -> list[str]:
    """The fenced ``bash`` blocks that directly follow :data:`MARK`."""
    pattern = re.compile(re.escape(MARK) + r"\n```bash\n(.*?)\n```", re.DOTALL)
    return pattern.findall(text)


def block_with(blocks: list[str], endpoint: str) -> str:
    (found,) = [b for b in blocks if f"localhost:8000/{endpoint}" in b]
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ServiceProcess]]:
    """A directory laid out as the README's commands expect, and the service they talk to."""
    seed_dir, template = template_store(tmp_path_factory.getbasetemp() / "readme_template", name="mnist")
    work = tmp_path_factory.mktemp("readme")
    store = clone_store(template, work / "model_store")
    (work / "docs").symlink_to(ROOT / "docs")
    svc = ServiceProcess(
        work / "api.log", model_store=str(store), seed_dir=str(seed_dir), models=["mnist"], token=None
    )
    try:
        svc.wait_ready()
        yield work, svc
    finally:
        svc.stop()


def run_block(block: str, work: Path, svc: ServiceProcess) -> str:
    script = block.replace("localhost:8000", f"127.0.0.1:{svc.port}")
    assert script != block  # the block talks to the service
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{svc.logs()[-3000:]}"
    return proc.stdout


def test_readme_is_about_a_page_and_marks_its_examples() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < MAX_README_LINES
    blocks = marked_blocks(text)
    assert len(blocks) == 2
    assert block_with(blocks, "predict")
    assert block_with(blocks, "adapt")


def test_the_sample_is_one_small_mnist_sized_png() -> None:
    assert SAMPLE.stat().st_size < 1024
    with Image.open(SAMPLE) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "L", (28, 28))


def test_readme_predict_example_runs_as_written(workdir: tuple[Path, ServiceProcess]) -> None:
    work, svc = workdir
    out = run_block(block_with(marked_blocks(README.read_text()), "predict"), work, svc)
    answer = json.loads(out)
    assert answer["model"] == "mnist"
    assert answer["version"] == 1
    (prediction,) = answer["predictions"]
    assert prediction["label"] in range(10)
    assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= prediction["unusual"] <= 1.0


def test_readme_adapt_example_runs_as_written(workdir: tuple[Path, ServiceProcess]) -> None:
    work, svc = workdir
    assert (work / "model_store" / ".token").exists()  # written by the service: no token was set
    out = run_block(block_with(marked_blocks(README.read_text()), "adapt"), work, svc)
    job = json.loads(out.strip().splitlines()[-1])
    assert job["model"] == "mnist"
    assert job["n_inputs"] == 10
    assert job["state"] in ("succeeded", "rejected"), job  # the gate's verdict, not an error
