"""The examples/ scripts run at CI size (`--small`) and print their results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script → a phrase its output must contain (evidence it got to the end)
EXAMPLES = {
    "bptt_sine.py": "gradient reaching h_1",
    "hessian_sharpness.py": "HVP vs finite differences",
    "implicit_layer.py": "IFT vs unrolled backprop",
    "maml_sine.py": "MAML init",
    "remat_memory.py": "bit-identical",
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs_small(script: str) -> None:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--small"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert EXAMPLES[script] in proc.stdout, proc.stdout[-2000:]
    assert "DIFFERENT" not in proc.stdout
