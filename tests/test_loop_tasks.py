"""The training-loop skeleton (resume, checkpoints, metrics rows after a kill) and the tasks."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data.errors import DataError
from rlhf_jax.data.tokenizers import train_bpe
from rlhf_jax.loop import TrainLoop
from rlhf_jax.metrics import read_metrics
from rlhf_jax.tasks import get_task, ImdbTask, JsonlTask


def _run(workdir, total, stop_after=None, state=None):
    loop = TrainLoop("toy", workdir, total, checkpoint_every=2, stop_after=stop_after)
    state = loop.restore(state if state is not None else {"w": jnp.zeros(3)})
    for step in loop.steps():
        state = {"w": state["w"] + step}
        loop.log(step, {"toy/w": state["w"].sum()})
        loop.end_step(step, state)
    loop.close()
    return loop, state


def test_loop_resumes_where_a_stopped_run_ended(tmp_path):
    _, full = _run(tmp_path / "full", 5)
    loop, _ = _run(tmp_path / "cut", 5, stop_after=3)
    assert not loop.finished and loop.last == 3
    loop, resumed = _run(tmp_path / "cut", 5)
    assert loop.start == 3 and loop.finished
    np.testing.assert_array_equal(resumed["w"], full["w"])
    rows = [json.loads(x) for x in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_rows_written_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    _run(tmp_path, 4)  # checkpoints at 2 and 4
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a killed run got to step 5 and 6 ...
        f.write(json.dumps({"step": 5, "toy/w": 1.0}) + "\n")
        f.write('{"step": 6, "toy/')  # ... and died mid-line
    _run(tmp_path, 7)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert read_metrics(tmp_path / "metrics.jsonl")[4]["toy/w"] == pytest.approx(3 * 15)


@pytest.mark.parametrize("field", ["total_steps", "checkpoint_every", "log_every"])
def test_loop_refuses_non_positive_sizes(tmp_path, field):
    kw = {"total_steps": 4, "checkpoint_every": 2, "log_every": 1, field: 0}
    with pytest.raises(ValueError, match=f"{field}=0: expected a positive integer"):
        TrainLoop("toy", tmp_path, kw.pop("total_steps"), **kw)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def jsonl_task(tmp_path):
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f" It is {2 * i}."}
            for i in range(30)] + [{"prompt": "A prompt without a demonstration"}]
    _jsonl(tmp_path / "train.jsonl", rows)
    _jsonl(tmp_path / "eval.jsonl", rows[:6])
    return tmp_path


def test_jsonl_task_gives_demonstrations_and_prompts(jsonl_task):
    task = get_task(f"jsonl:{jsonl_task}")
    assert isinstance(task, JsonlTask)
    sft = task.sft_source("train")
    assert len(sft) == 30 and sft[3]["text"] == "Question 3: what is 3 plus 3? It is 6."
    assert len(task.sft_source("train", 10)) == 10
    prompts = task.prompt_source("train")
    assert len(prompts) == 31 and prompts[-1]["text"] == "A prompt without a demonstration"
    assert task.gold_scorer(None) == (None, None)
    tok = train_bpe([r["text"] for r in sft], 300)
    tokens, mask, texts = task.prompt_set("eval", tok, 8, 4)
    assert tokens.shape == mask.shape == (4, 8) and len(texts) == 4
    assert mask[:, -1].all()  # left-padded: the last position is always real
    assert len(task.prompt_set("eval", tok, 8)[2]) == 6  # None: the whole split
    with pytest.raises(ValueError, match="7 prompts asked from split 'eval', which has 6"):
        task.prompt_set("eval", tok, 8, 7)  # more than the split holds: never fewer, silently


def test_jsonl_task_errors_name_the_file_line_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl does not exist"):
        JsonlTask(str(tmp_path)).records("train")
    _jsonl(tmp_path / "train.jsonl", [{"prompt": "ok"}, {"response": "no prompt"}])
    with pytest.raises(DataError, match=r"train.jsonl:2.*prompt"):
        JsonlTask(str(tmp_path)).records("train")
    _jsonl(tmp_path / "train.jsonl", [{"prompt": "ok", "response": 3}])
    with pytest.raises(DataError, match=r"train.jsonl:1.*response"):
        JsonlTask(str(tmp_path)).records("train")
    _jsonl(tmp_path / "train.jsonl", [{"prompt": "only prompts"}])
    with pytest.raises(ValueError, match="nothing to fine-tune on"):
        JsonlTask(str(tmp_path)).sft_source("train")
    with pytest.raises(ValueError, match="task='csv:x'"):
        get_task("csv:x")


def test_imdb_task_is_the_default():
    assert isinstance(get_task(), ImdbTask) and get_task().prompt_keep == "first"


def test_weights_and_biases_logs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is installed by the test extras")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    loop = TrainLoop("toy", tmp_path, 3, checkpoint_every=3, wandb=True, config={"lr": 0.1})
    loop.restore({"w": jnp.zeros(2)})
    for step in loop.steps():
        loop.log(step, {"toy/x": float(step)})
        loop.end_step(step, {"w": jnp.ones(2) * step})
    loop.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "expected one offline run (no account, no network)"
    assert list(runs[0].glob("*.wandb")), "the run's event file holds the logged rows"
