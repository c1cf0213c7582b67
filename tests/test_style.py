"""The repository follows one style (setup.cfg): flake8 and isort must pass on every package."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATHS = ["rlhf_jax", "experiments", "benchmarks", "tests"]


@pytest.mark.parametrize("tool", [["flake8"], ["isort", "--check-only", "--diff"]],
                         ids=["flake8", "isort"])
def test_style(tool):
    pytest.importorskip(tool[0], reason=f"{tool[0]} is installed by the test extras")
    proc = subprocess.run([sys.executable, "-m", *tool, *PATHS], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
