"""Reliability: re-runs never mix two runs' results, non-finite values stop a run, output folders
are checked before the first step, checkpoints and final outputs are written all or nothing.

(Hard kills of whole stages are in ``tests/test_kills.py``; invalid configs in
``tests/experiments/test_experiments.py``; malformed input files in ``tests/test_bad_files.py``.)
"""
import dataclasses
import glob
import json
import os
from pathlib import Path
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import collect, pipeline, ppo, reward, sft
from rlhf_jax import ppo as ppo_lib
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.loop import (check_output_dir, NonFiniteError, OutputDirError, RunMismatchError,
                           TrainLoop)
from rlhf_jax.models import hf
from rlhf_jax.runs import (load_bundle, load_params_into, params_of, save_bundle, write_summary,
                           writing_dir)

STAGES = {"sft": sft, "collect": collect, "reward": reward, "ppo": ppo}


# ------------------------------------------------------------------------------------------------
# The loop and the checkpointer on a toy state (seconds).

def _toy(workdir, total, fp=None, nan_at=None, **kw):
    """A toy stage: ``w += step``; ``toy/loss`` is NaN at ``nan_at``."""
    loop = TrainLoop("toy", workdir, total, checkpoint_every=2, fingerprint=fp, **kw)
    state = loop.restore({"w": jnp.zeros(3)})
    for step in loop.steps():
        state = {"w": state["w"] + step}
        metrics = {"toy/loss": jnp.where(step == nan_at, jnp.nan, state["w"].sum()),
                   "toy/grad_norm": jnp.float32(1.0)}
        loop.check_finite(step, metrics, ("toy/loss", "toy/grad_norm"))
        loop.log(step, metrics)
        loop.end_step(step, state)
    loop.close()
    return loop, state


def _steps(workdir):
    with Checkpointer(Path(workdir) / "ckpt") as ckpt:
        return ckpt.all_steps()


def test_saving_over_an_existing_step_replaces_it(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(4, {"w": jnp.ones(3)}, {"step": 4, "run": "old"})
        ckpt.save(4, {"w": jnp.full(3, 7.0)}, {"step": 4, "run": "new"})
        state, meta = ckpt.restore({"w": jnp.zeros(3)})
        assert meta["run"] == "new" and ckpt.restore_meta(4)["run"] == "new"
        np.testing.assert_array_equal(state["w"], 7.0)
        ckpt.save(2, {"w": jnp.full(3, 2.0)}, {"step": 2})  # older than the newest: still written
        assert ckpt.all_steps() == [2, 4]
        np.testing.assert_array_equal(ckpt.restore({"w": jnp.zeros(3)}, 2)[0]["w"], 2.0)


def test_a_checkpoint_of_another_run_is_refused_naming_what_changed(tmp_path):
    old = {"config": {"learning_rate": 0.1, "seed": 0}, "data": {"texts": "aaaa"}}
    _toy(tmp_path, 4, fp=old)
    new = {"config": {"learning_rate": 0.2, "seed": 0}, "data": {"texts": "bbbb"}}
    with pytest.raises(RunMismatchError) as e:
        TrainLoop("toy", tmp_path, 4, checkpoint_every=2, fingerprint=new)
    msg = str(e.value)
    for part in ("[toy]", f"{tmp_path}/ckpt/4", "learning_rate: 0.1 → 0.2",
                 "input texts: 'aaaa' → 'bbbb'", f"rm -rf {tmp_path}", "another --workdir"):
        assert part in msg, (part, msg)
    assert "seed" not in msg
    assert _steps(tmp_path) == [2, 4]  # refused before touching anything


def test_a_run_extends_but_never_shortens(tmp_path):
    _, full = _toy(tmp_path / "full", 6)
    _toy(tmp_path / "ext", 4)
    (tmp_path / "ext" / "summary.json").write_text("{}")  # the 4-step run had finished
    loop, extended = _toy(tmp_path / "ext", 6)
    assert loop.start == 4 and loop.finished
    np.testing.assert_array_equal(extended["w"], full["w"])
    assert not (tmp_path / "ext" / "summary.json").exists()  # the stale finished marker is gone
    rows = [json.loads(x)["step"] for x in open(tmp_path / "ext" / "metrics.jsonl")]
    assert rows == [1, 2, 3, 4, 5, 6]
    with pytest.raises(RunMismatchError, match=r"at step 6, beyond this run's 4: a run can be "
                                               r"extended but not shortened"):
        TrainLoop("toy", tmp_path / "ext", 4, checkpoint_every=2)


def test_rows_of_a_run_killed_before_its_first_checkpoint_are_dropped(tmp_path):
    """E.g. PPO's step-0 evaluation row: logged, then the run was killed before checkpoint 2; the
    re-run starts from scratch and logs it again, once."""
    tmp_path.joinpath("metrics.jsonl").write_text('{"step": 0, "eval/x": 1.0}\n{"step": 1}\n')
    _toy(tmp_path, 4)
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncated state", "no metadata", "empty folder"])
def test_a_half_written_checkpoint_falls_back_to_the_last_complete_one(tmp_path, damage, capsys):
    _, full = _toy(tmp_path / "full", 8)
    wd = tmp_path / "cut"
    _toy(wd, 4)
    half = wd / "ckpt" / "6"
    shutil.copytree(wd / "ckpt" / "4", half)  # step 6, written by a file system without atomic
    if damage == "truncated state":           # renames, cut off half-way
        for f in glob.glob(f"{half}/state/**", recursive=True):
            if os.path.isfile(f):
                os.truncate(f, os.path.getsize(f) // 2)
    elif damage == "no metadata":
        os.remove(half / "meta" / "metadata")
    else:
        for p in half.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (wd / "ckpt" / "8.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # a killed save
    capsys.readouterr()
    loop, resumed = _toy(wd, 8)
    out = capsys.readouterr().out
    assert f"checkpoint {wd}/ckpt/6 is incomplete or unreadable" in out, out
    assert "falling back to the one before" in out
    assert "removed 8.orbax-checkpoint-tmp" in out
    assert "resumed from step 4 (not the newest, 6: unreadable)" in out
    assert loop.start == 4
    np.testing.assert_array_equal(resumed["w"], full["w"])
    assert _steps(wd) == [6, 8]  # the damaged step was replaced by a complete one
    assert [json.loads(x)["step"] for x in open(wd / "metrics.jsonl")] == list(range(1, 9))


def test_a_non_finite_value_stops_the_run_before_anything_of_its_step_is_saved(tmp_path):
    with pytest.raises(NonFiniteError) as e:
        _toy(tmp_path, 6, nan_at=3)
    msg = str(e.value)
    for part in ("[toy] step 3: toy/loss = nan is not finite", "before saving anything of step 3",
                 f"the last good checkpoint is step 2 ({tmp_path}/ckpt/2)"):
        assert part in msg, (part, msg)
    assert _steps(tmp_path) == [2]
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2]
    with pytest.raises(NonFiniteError, match=r"step 1: toy/loss = nan .* no checkpoint was "
                                             r"written yet"):
        _toy(tmp_path / "first", 6, nan_at=1)
    assert _steps(tmp_path / "first") == []


def test_an_unwritable_or_full_output_folder_is_refused_before_the_first_step(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for bad in (a_file / "sub", Path("/proc/rlhf_jax_no_such_dir")):
        with pytest.raises(OutputDirError, match=r"\[toy\] cannot write to the output folder"):
            TrainLoop("toy", bad, 4, checkpoint_every=2)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OutputDirError, match=r"\[toy\] the disk of the output folder .* is full: "
                                             r"[0-9.]+ MiB free, at least [0-9.]+ MiB needed"):
        TrainLoop("toy", tmp_path / "w", 4, checkpoint_every=2, min_free_bytes=free + (1 << 40))
    assert not (tmp_path / "w" / "ckpt").exists()
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
    assert check_output_dir("toy", tmp_path / "ok") == tmp_path / "ok"
    assert list((tmp_path / "ok").iterdir()) == []  # the probe file is removed


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_refuses_an_unwritable_workdir_before_any_work(stage, tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = dataclasses.replace(STAGES[stage].PRESETS["tiny"],
                              workdir=str(tmp_path / "a_file" / "sub"))
    with pytest.raises(OutputDirError, match=rf"\[{stage}\] cannot write to the output folder "
                                             rf".*a_file/sub.*Not a directory"):
        STAGES[stage].train(cfg)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "final"
    with writing_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with writing_dir(target) as tmp:
            (tmp / "a.txt").write_text("second, half-written")
            raise RuntimeError("disk on fire")
    assert (target / "a.txt").read_text() == "first"
    (tmp_path / ".final.tmp").mkdir()  # leftovers of a process killed while writing
    (tmp_path / ".final.old").mkdir()
    with writing_dir(target) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    write_summary(tmp_path, {"x": np.float32(1.5)})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"x": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "summary.json"]


# ------------------------------------------------------------------------------------------------
# The stages, on the session's tiny pipeline (its folders are copied, never changed).

def _copy_stage(cfg, name, tmp_path):
    src = pipeline.stage_configs(cfg)[name]
    shutil.copytree(src.workdir, tmp_path / name)
    return dataclasses.replace(src, workdir=str(tmp_path / name))


CHANGES = {
    "sft": (dict(learning_rate=2e-3), ["learning_rate: 0.001 → 0.002"]),
    "collect": (dict(labeler_temperature=0.7), ["labeler_temperature: 0.5 → 0.7"]),
    "reward": (dict(loss="best_of_k", pool="mean"), ["loss: 'ranking' → 'best_of_k'",
                                                     "pool: 'last' → 'mean'"]),
    "ppo": (dict(kl_coef=0.3), ["kl_coef: 0.1 → 0.3"]),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_rerun_with_another_config_is_refused(tiny_run, tmp_path, stage):
    cfg = _copy_stage(tiny_run[0], stage, tmp_path)
    before = (Path(cfg.workdir) / "summary.json").read_text()
    changes, expected = CHANGES[stage]
    with pytest.raises(RunMismatchError) as e:
        STAGES[stage].train(dataclasses.replace(cfg, **changes))
    for part in expected + [f"rm -rf {cfg.workdir}", f"[{stage}]"]:
        assert part in str(e.value), (part, str(e.value))
    assert (Path(cfg.workdir) / "summary.json").read_text() == before  # nothing was touched


def test_reward_rerun_on_changed_comparisons_is_refused(tiny_run, tmp_path):
    cfg = _copy_stage(tiny_run[0], "reward", tmp_path)
    comps = tmp_path / "comparisons"
    shutil.copytree(cfg.comparisons_dir, comps)
    recs = [json.loads(x) for x in open(comps / "train.jsonl")]
    recs[0]["ranks"] = recs[0]["ranks"][::-1]  # one person changed their mind
    (comps / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(RunMismatchError, match=r"input comparisons: '[0-9a-f]{16}' → "
                                               r"'[0-9a-f]{16}'"):
        reward.train(dataclasses.replace(cfg, comparisons_dir=str(comps)))
    shutil.copy(Path(cfg.comparisons_dir) / "train.jsonl", comps / "train.jsonl")
    with pytest.raises(RunMismatchError, match=r"input sft: '[0-9a-f]{16}' → '[0-9a-f]{16}'"):
        reward.train(dataclasses.replace(cfg, comparisons_dir=str(comps),
                                         sft_dir=str(Path(cfg.sft_dir).parent / "half")))


def _leaves(params):
    return jax.tree.leaves(params)


def test_ppo_rerun_with_more_iterations_continues_and_rewrites_every_final_output(
        tiny_run, tmp_path, capsys):
    """The bug this fixes: a PPO run extended from 4 to 6 iterations left ``final/params`` of the
    4-iteration run beside the 6-iteration HF export and summary."""
    cfg = _copy_stage(tiny_run[0], "ppo", tmp_path)  # a finished 4-iteration run
    four = _leaves(params_of(load_bundle(tmp_path / "ppo" / "final")[0]))
    capsys.readouterr()
    summary = ppo.train(dataclasses.replace(cfg, iterations=6))
    out = capsys.readouterr().out
    assert "resumed from iteration 4" in out and "goes on to 6" in out, out
    six = _leaves(params_of(load_bundle(tmp_path / "ppo" / "final")[0]))
    assert any(not np.array_equal(a, b) for a, b in zip(four, six))
    _, exported = hf.load_pretrained(str(tmp_path / "ppo" / "final" / "hf"))
    for a, b in zip(six, _leaves(params_of(exported))):
        np.testing.assert_array_equal(a, b)
    assert summary["iterations"] == 6
    assert json.loads((tmp_path / "ppo" / "summary.json").read_text())["iterations"] == 6
    assert [json.loads(x)["step"] for x in open(tmp_path / "ppo" / "metrics.jsonl")] == \
        list(range(7))
    assert _steps(tmp_path / "ppo")[-1] == 6
    assert sorted(p.name for p in (tmp_path / "ppo").iterdir() if p.name.startswith(".")) == []


def _nan_bundle(src, dst, kind, where):
    """A copy of the bundle ``src`` with NaN in the parameters ``where(params)`` picks."""
    model, mcfg, tok, meta = load_bundle(src)
    params = params_of(model)
    where(params)
    load_params_into(model, params)
    save_bundle(dst, model, mcfg, tok, kind=kind, head_init=meta.get("head_init"),
                extra={k: v for k, v in meta.items() if k not in ("kind", "config", "head_init")})
    return str(dst)


def _first_leaf_nan(params):
    """Every weight of the token embedding (the first parameter in tree order) NaN."""
    leaves, tree = jax.tree.flatten(params)
    leaves[0] = np.full_like(leaves[0], np.nan)
    params.update(jax.tree.unflatten(tree, leaves))


def _assert_nothing_saved(workdir, steps=()):
    workdir = Path(workdir)
    assert _steps(workdir) == list(steps)
    for name in ("final", "half", "summary.json", "samples.md"):
        assert not (workdir / name).exists(), name


def test_a_nan_reward_stops_ppo(tiny_run, tmp_path):
    """A reward model whose head bias is NaN: every score is NaN; the first evaluation (of the SFT
    policy, iteration 0) stops the run before any iteration or checkpoint."""
    stages = pipeline.stage_configs(tiny_run[0])

    def nan_bias(p):
        p["head"]["bias"] = np.full_like(p["head"]["bias"], np.nan)

    rm = _nan_bundle(stages["ppo"].reward_dir, tmp_path / "nan_rm", "scalar", nan_bias)
    cfg = dataclasses.replace(stages["ppo"], workdir=str(tmp_path / "ppo"), reward_dir=rm)
    with pytest.raises(NonFiniteError) as e:
        ppo.train(cfg)
    msg = str(e.value)
    for part in ("[ppo] iteration 0: eval/scores = nan is not finite", "no checkpoint was "
                 "written yet"):
        assert part in msg, (part, msg)
    _assert_nothing_saved(cfg.workdir)


def test_a_nan_parameter_stops_ppo_at_the_rollout_naming_the_last_good_checkpoint(
        tiny_run, tmp_path):
    """A finished 4-iteration run whose last checkpoint's policy then got a NaN (as a bad disk
    could do), extended to 6: the first rollout has a NaN KL. The run stops at iteration 5, names
    checkpoint 4, and writes no step 5 or 6, bundle or export."""
    cfg = _copy_stage(tiny_run[0], "ppo", tmp_path)
    shutil.rmtree(tmp_path / "ppo" / "final")
    for name in ("summary.json", "samples.md"):
        (tmp_path / "ppo" / name).unlink()
    policy, _, critic, _, _, _ = ppo.load_models(cfg)
    template = ppo_lib.init_state(cfg, policy, critic, ppo_lib.make_optimizer(cfg))
    with Checkpointer(tmp_path / "ppo" / "ckpt") as ckpt:
        state, meta = ckpt.restore(template)
        nan_policy = jax.tree.map(lambda x: x * jnp.nan, state.params["policy"])
        ckpt.save(4, state.replace(params={**state.params, "policy": nan_policy}), meta)
    with pytest.raises(NonFiniteError) as e:
        ppo.train(dataclasses.replace(cfg, iterations=6))
    msg = str(e.value)
    for part in ("[ppo] iteration 5: objective/kl = nan is not finite", "also non-finite: ",
                 "ppo/loss", f"last good checkpoint is iteration 4 ({tmp_path}/ppo/ckpt/4)"):
        assert part in msg, (part, msg)
    _assert_nothing_saved(cfg.workdir, [2, 4])
    assert max(json.loads(x)["step"] for x in open(tmp_path / "ppo" / "metrics.jsonl")) == 4


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_a_nan_weight_stops_sft_and_reward_training_at_step_1(tiny_run, tmp_path, stage):
    stages = pipeline.stage_configs(tiny_run[0])
    bad = _nan_bundle(stages["reward"].sft_dir, tmp_path / "nan_sft", "lm", _first_leaf_nan)
    if stage == "sft":
        cfg = dataclasses.replace(stages["sft"], workdir=str(tmp_path / stage), init_from=bad)
    else:
        cfg = dataclasses.replace(stages["reward"], workdir=str(tmp_path / stage), sft_dir=bad)
    metric = {"sft": "lm/loss", "reward": "rm/loss"}[stage]
    with pytest.raises(NonFiniteError, match=rf"\[{stage}\] step 1: {metric} = nan is not finite"
                                             rf".*no checkpoint was written yet"):
        STAGES[stage].train(cfg)
    _assert_nothing_saved(cfg.workdir)
