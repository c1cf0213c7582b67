"""The notebooks: stored without outputs, and executed top to bottom in a fresh ``python3`` kernel.

The kernel is a separate process: it inherits the environment given here (one plain CPU device, not
the 8 simulated devices of the test process; TFDS data in a temporary directory) and runs in a
temporary working directory, so nothing is written into the checkout.
"""
import os
from pathlib import Path
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("quickstart.ipynb", "rlhf_math.ipynb", "lora_chat.ipynb")
# Appended to the executed copy: which interpreter the kernel really is.
WHOAMI = "import sys; print('KERNEL-PYTHON', sys.prefix)"


def _read(name):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_clean(name):
    """nbformat v4, valid, no outputs or execution counts, a python3 kernelspec, and every code
    cell is plain Python (no IPython magics, so the cells also run as a script)."""
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, \
            f"{name}: code cell {i} has stored outputs; strip them before committing"
        compile(cell.source, f"{name}[code cell {i}]", "exec")


def test_quickstart_is_parameterised_by_preset():
    src = "\n".join(c.source for c in _read("quickstart.ipynb").cells if c.cell_type == "code")
    assert 'PRESET = "tiny"' in src
    assert "pipeline.train(" in src and "load_bundle(" in src and "generate_text(" in src


def _kernel_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["JAX_PLATFORMS"] = "cpu"
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("MPLBACKEND", None)  # the kernel's own inline backend, so figures become outputs
    return env


def _execute(name: str, tmp_path: Path, cell_timeout: int):
    """Runs a copy of the notebook in ``tmp_path``; returns it with its outputs."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    # jupyter_client replaces a bare "python" in argv with the running interpreter (this venv).
    assert Path(spec.argv[0]).name.startswith("python"), spec.argv
    nb = _read(name)
    nb.cells.append(nbformat.v4.new_code_cell(WHOAMI))
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=cell_timeout,
                                     resources={"metadata": {"path": str(work)}})
    client.execute(env=_kernel_env(tmp_path))  # raises CellExecutionError on the first failure
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert f"KERNEL-PYTHON {sys.prefix}" in last, f"kernel ran another python: {last!r}"
    return nb, work


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)


def _text(cell) -> str:
    parts = []
    for o in cell.outputs:
        parts.append(o.get("text", ""))
        parts.extend(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
    return "".join(parts)


@pytest.mark.slow  # reason: kernel start, JAX import and ~10 small compilations: ~1 min on 2 cores
def test_rlhf_math_notebook_runs(tmp_path):
    nb, _ = _execute("rlhf_math.ipynb", tmp_path, cell_timeout=600)
    assert _images(nb) >= 4  # Bradley-Terry, PPO clip, KL estimators, KL controller
    out = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "KERNEL-PYTHON" in out and "Traceback" not in out


@pytest.mark.slow  # reason: the whole tiny pipeline (IMDB build, SFT, collection, RM, PPO): minutes
def test_quickstart_notebook_runs(tmp_path):
    nb, work = _execute("quickstart.ipynb", tmp_path, cell_timeout=1800)
    run = work / "runs" / "tiny"
    for rel in ("summary.json", "report.md", "ppo/final/model.json", "ppo/samples.md",
                "ppo/ppo.png", "reward/reward.png", "sft/loss.png"):
        assert (run / rel).exists(), rel
    assert _images(nb) >= 3  # ppo.png, reward.png, loss.png
    generated = [c for c in nb.cells if c.cell_type == "code" and "generate_text(" in c.source]
    assert generated and "PROMPT:" in _text(generated[-1])


@pytest.mark.slow  # reason: the tiny LoRA chat pipeline (IMDB build, 4 stages) and transformers
def test_lora_chat_notebook_runs(tmp_path):
    nb, work = _execute("lora_chat.ipynb", tmp_path, cell_timeout=1800)
    run = work / "runs" / "chat-tiny"
    for rel in ("summary.json", "report.md", "ppo/adapters/adapter.json", "ppo/samples.md",
                "ppo/hf/config.json", "sft/loss.png", "reward/reward.png", "ppo/ppo.png"):
        assert (run / rel).exists(), rel
    assert _images(nb) >= 3  # loss.png, reward.png, ppo.png
    out = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "Traceback" not in out
    # Fresh adapters leave the base's logits exactly as they were.
    assert "max |logits(base) - logits(base + fresh adapters)| = 0.0\n" in out
    # PPO's adapters name the SFT model: loading them onto the pretrained base is refused.
    assert "refused:" in out and "trained on the base" in out
    assert out.count("PROMPT:") == 3
    # The merged export, loaded by transformers, gives our logits.
    diff = re.search(r"max \|logits\(ours\) - logits\(transformers\)\| = (\S+)", out)
    assert diff is not None, "the transformers check did not run"
    assert float(diff.group(1)) < 1e-4
