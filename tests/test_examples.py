"""The examples/ scripts run at CI size (`--small`), print their results and check their own
figures: each exits non-zero (``raise SystemExit("FAILED: …")``) when its figure is off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script → a phrase its output must contain (evidence it got to the end)
EXAMPLES = {
    "binarized_digits.py": "sign network: hidden outputs take the values [-1.0, 1.0]",
    "bptt_sine.py": "gradient reaching h_1",
    "hessian_sharpness.py": "HVP vs finite differences",
    "implicit_layer.py": "IFT vs unrolled backprop",
    "maml_sine.py": "MAML init",
    "remat_memory.py": "bit-identical",
    "rnn_long_range.py": "vanishing over time: the ratio falls with T",
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


def _run(path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(path), "--small"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_every_example_checks_its_figure(script: str) -> None:
    assert 'raise SystemExit(f"FAILED: ' in (ROOT / "examples" / script).read_text()


def test_a_failed_check_exits_non_zero(tmp_path) -> None:
    """The same script with its threshold made unreachable must fail, naming the figure."""
    src = (ROOT / "examples" / "bptt_sine.py").read_text()
    assert "curve[-1] < curve[0] / 20" in src
    bad = tmp_path / "bptt_sine.py"
    bad.write_text(src.replace("curve[-1] < curve[0] / 20", "curve[-1] < curve[0] / 1e9"))
    proc = _run(bad)
    assert proc.returncode == 1 and "FAILED: full BPTT val loss" in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs_small(script: str) -> None:
    proc = _run(ROOT / "examples" / script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert EXAMPLES[script] in proc.stdout, proc.stdout[-2000:]
    assert "DIFFERENT" not in proc.stdout
