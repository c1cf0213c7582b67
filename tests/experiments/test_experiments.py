"""The experiments end to end on the ``tiny`` presets: outputs, checkpoints, resume, devices."""
import dataclasses
import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import collect, common, grpo, pipeline, ppo, reward, seeds, sft
from rlhf_jax import parallel
from rlhf_jax import ppo as ppo_lib
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.data.batching import decode_rows
from rlhf_jax.loop import RunMismatchError
from rlhf_jax.metrics import read_metrics
from rlhf_jax.models.heads import ScalarEnsemble
from rlhf_jax.runs import load_bundle, params_of
from rlhf_jax.scoring import RewardScorer
from rlhf_jax.tasks import get_task

MODULES = (sft, collect, reward, ppo, seeds, grpo, pipeline)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.split(".")[-1])
def test_every_preset_parses(module):
    for name, preset in module.PRESETS.items():
        assert common.parse(module.Config, module.PRESETS, ["--preset", name]) == preset
    cfg = common.parse(module.Config, module.PRESETS, ["--preset", "tiny", "--seed", "3"]
                       if module is not pipeline else ["--preset", "tiny", "--ppo.seed", "3"])
    assert (cfg.ppo.seed if module is pipeline else cfg.seed) == 3
    with pytest.raises(SystemExit):
        common.parse(module.Config, module.PRESETS, ["--preset", "no-such-preset"])


def test_tiny_pipeline_writes_every_output(tiny_run):
    cfg, summary = tiny_run
    sft_cfg, collect_cfg, reward_cfg, ppo_cfg = pipeline.stage_configs(cfg).values()
    for stage_cfg in (sft_cfg, reward_cfg, ppo_cfg):
        wd = stage_cfg.workdir
        with Checkpointer(f"{wd}/ckpt") as ckpt:
            assert ckpt.latest_step() is not None, wd
        rows = [json.loads(x) for x in open(f"{wd}/metrics.jsonl")]
        assert rows and all(np.isfinite(v) for r in rows for v in r.values()), wd
        assert (common.Path(wd) / "summary.json").exists()
        assert list((common.Path(wd) / "tensorboard").glob("events.*")), wd
        assert (common.Path(wd) / "final" / "model.json").exists()
    ppo_dir = common.Path(ppo_cfg.workdir)
    for name in ("ppo.png", "gold_vs_kl.png", "samples.md"):
        assert (ppo_dir / name).stat().st_size > 0
    keys = set().union(*[json.loads(x) for x in open(ppo_dir / "metrics.jsonl")])
    for k in ("objective/kl", "objective/scores", "ppo/clipfrac", "ppo/approxkl",
              "ppo/val/clipfrac", "ppo/val/explained_var", "objective/entropy",
              "objective/kl_coef", "objective/gold"):
        assert k in keys, k
    comps = [json.loads(x) for x in open(f"{collect_cfg.workdir}/train.jsonl")]
    assert len(comps) == collect_cfg.train_prompts
    k = len(collect_cfg.policies) * len(collect_cfg.temperatures)
    assert all(len(c["responses"]) == len(c["ranks"]) == k for c in comps)
    for key in ("sft_gold_positive", "ppo_gold_positive", "ppo_kl_to_sft",
                "rm_heldout_accuracy_vs_gold"):
        assert summary[key] is not None and np.isfinite(summary[key]), key
    # Re-running the pipeline skips every finished stage and reproduces the same summary.
    again = pipeline.train(cfg)
    assert again["ppo_gold_positive"] == summary["ppo_gold_positive"]


def _final_params(workdir):
    model, _, _, _ = load_bundle(f"{workdir}/final", kind="lm")
    return jax.tree.leaves(params_of(model))


def test_killed_ppo_run_resumes_bit_identically(tiny_run, tmp_path):
    cfg, _ = tiny_run
    base = pipeline.stage_configs(cfg)["ppo"]
    full = dataclasses.replace(base, workdir=str(tmp_path / "full"), iterations=4,
                               checkpoint_every=2, eval_every=100)
    ppo.train(full)
    killed = dataclasses.replace(full, workdir=str(tmp_path / "killed"), stop_after=2)
    assert ppo.train(killed) == {"stage": "ppo", "stopped_at": 2}
    ppo.train(dataclasses.replace(killed, stop_after=None))  # the same command, re-run
    for a, b in zip(_final_params(full.workdir), _final_params(killed.workdir)):
        np.testing.assert_array_equal(a, b)
    rows_full = [json.loads(x) for x in open(f"{full.workdir}/metrics.jsonl")]
    rows_killed = {json.loads(x)["step"]: json.loads(x) for x in
                   open(f"{killed.workdir}/metrics.jsonl")}
    assert set(rows_killed) == {r["step"] for r in rows_full}
    for r in rows_full:
        for k in ("objective/scores", "objective/kl", "ppo/clipfrac"):
            if k in r:
                assert rows_killed[r["step"]][k] == r[k], (r["step"], k)


def _ppo_iteration(cfg, pcfg):
    """``(jitted iteration, state, ref_params, rm_params, tokens, mask, tok)`` of the PPO stage
    ``pcfg`` on the tiny run's models and one batch of its training prompts (not placed)."""
    policy, rm, critic, _, tok, reward_scorer = ppo.load_models(pcfg)
    lm_def, ref_params = nnx.split(policy)
    tx = ppo_lib.make_optimizer(pcfg)
    program = ppo_lib.make_ppo(pcfg, lm_def, nnx.graphdef(critic), reward_scorer, tx,
                               ppo_lib.sampling_config(pcfg, tok.pad_id, None))
    task = get_task("imdb", cfg.data_dir)
    tokens, mask, _ = task.prompt_set("train", tok, pcfg.query_len, pcfg.batch_size)
    state = ppo_lib.init_state(pcfg, policy, critic, tx)
    return jax.jit(program.iteration), state, ref_params, nnx.state(rm), tokens, mask, tok


def test_one_ppo_iteration_on_8_devices_matches_1_device(tiny_run):
    cfg, _ = tiny_run
    fn, state0, ref_params, rm_params, tokens, mask, _ = _ppo_iteration(
        cfg, pipeline.stage_configs(cfg)["ppo"])
    results = []
    for n in (1, 8):
        mesh = parallel.make_mesh(n)
        state = parallel.replicate(state0, mesh)
        batch = parallel.shard_batch({"t": tokens, "m": mask}, mesh)
        _, metrics, resp, _ = fn(state, parallel.replicate(ref_params, mesh),
                                 parallel.replicate(rm_params, mesh), batch["t"], batch["m"])
        assert len(resp.sharding.device_set) == n
        results.append((jax.device_get(metrics), np.asarray(resp)))
    (m1, r1), (m8, r8) = results
    np.testing.assert_array_equal(r1, r8)
    assert set(m1) == set(m8)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_human_labeling_round_trip_through_export_and_import(tiny_run, tmp_path):
    cfg, _ = tiny_run
    base = dataclasses.replace(pipeline.stage_configs(cfg)["collect"],
                               workdir=str(tmp_path / "collect"), train_prompts=8, eval_prompts=8)
    out = collect.train(dataclasses.replace(base, labeler="export"))
    assert out["stopped_at"] == "waiting for rankings"
    assert not (tmp_path / "collect" / "summary.json").exists()  # the stage is not finished
    to_label = tmp_path / "collect" / "to_label"
    filled = tmp_path / "filled"
    filled.mkdir()
    for split in ("train", "eval"):
        rows = [json.loads(x) for x in open(to_label / f"{split}.jsonl")]
        assert all(r["ranks"] is None for r in rows)
        with open(filled / f"{split}.jsonl", "w") as f:
            for r in rows:  # a "person" ranks the responses in reverse order
                k = len(r["responses"])
                f.write(json.dumps(dict(r, ranks=list(range(k))[::-1], labeler="ann")) + "\n")
    summary = collect.train(dataclasses.replace(base, labeler="import",
                                                rankings_file=str(filled)))
    assert summary["train_comparisons"] == 8
    exported = [json.loads(x) for x in open(to_label / "train.jsonl")]
    imported = [json.loads(x) for x in open(tmp_path / "collect" / "train.jsonl")]
    assert [r["responses"] for r in imported] == [r["responses"] for r in exported]
    assert all(r["ranks"] == list(range(len(r["responses"])))[::-1] and r["labeler"] == "ann"
               for r in imported)
    with pytest.raises(FileNotFoundError, match="no train.jsonl"):
        collect.train(dataclasses.replace(base, workdir=str(tmp_path / "c2"), labeler="import",
                                          rankings_file=str(tmp_path)))


def test_sft_and_collect_run_on_your_own_jsonl_task(tmp_path):
    """The second task: prompts and demonstrations from JSONL, no gold scorer. SFT trains on it;
    the simulated labeler is refused (no gold) and the export for people works."""
    rows = [{"prompt": f"Review {i}: the film", "response": f" was {'good' if i % 2 else 'bad'}."}
            for i in range(40)]
    for split, rs in (("train", rows), ("eval", rows[:8])):
        (tmp_path / "task").mkdir(exist_ok=True)
        (tmp_path / "task" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rs))
    task = f"jsonl:{tmp_path / 'task'}"
    summary = sft.train(dataclasses.replace(sft.PRESETS["tiny"], task=task, vocab_size=300,
                                            workdir=str(tmp_path / "sft"), max_train_texts=None))
    assert np.isfinite(summary["eval_loss"]) and summary["vocab_size"] <= 300
    base = dataclasses.replace(collect.PRESETS["tiny"], task=task, gold_path=None,
                               workdir=str(tmp_path / "collect"), train_prompts=8, eval_prompts=4,
                               policies=(str(tmp_path / "sft" / "final"),
                                         str(tmp_path / "sft" / "half")))
    with pytest.raises(ValueError, match="needs a gold scorer"):
        collect.train(base)
    out = collect.train(dataclasses.replace(base, labeler="export"))
    assert out["stopped_at"] == "waiting for rankings"
    exported = [json.loads(x) for x in open(tmp_path / "collect" / "to_label" / "train.jsonl")]
    assert len(exported) == 8 and all(r["prompt"].startswith("Review") for r in exported)


INVALID = [
    (sft, dict(batch_size=-8), "batch_size=-8"),
    (sft, dict(steps=0), "steps=0"),
    (sft, dict(learning_rate=float("nan")), "learning_rate=nan"),
    (sft, dict(checkpoint_every=0), "checkpoint_every=0"),
    (sft, dict(compute_dtype="float16"), "compute_dtype='float16'"),
    (reward, dict(loss="hinge"), "loss='hinge'"),
    (reward, dict(pool="max"), "pool='max'"),
    (reward, dict(epochs=0), "epochs=0"),
    (reward, dict(learning_rate=float("inf")), "learning_rate=inf"),
    (reward, dict(seeds=0), "seeds=0"),
    (collect, dict(labeler="crowd"), "labeler='crowd'"),
    (collect, dict(temperatures=(0.0,), policies=("a", "b")), "temperatures"),
    (collect, dict(policies=("a",), temperatures=(1.0,)), "at least 2 responses"),
    (collect, dict(labeler="import", rankings_file=None), "rankings_file=None"),
    (collect, dict(train_prompts=0), "train_prompts=0"),
    (ppo, dict(num_minibatches=0), "num_minibatches=0"),
    (ppo, dict(batch_size=6, num_minibatches=4), "batch_size=6"),
    (ppo, dict(kl_estimator="k7"), "kl_estimator='k7'"),
    (ppo, dict(learning_rate=float("nan")), "learning_rate=nan"),
    (ppo, dict(checkpoint_every=0), "checkpoint_every=0"),
    (ppo, dict(missing_eos_penalty=-1.0, stop_token=None), "needs --stop-token"),
    (ppo, dict(temperature=0.0), "temperature=0.0"),
    (ppo, dict(eval_prompts=0), "eval_prompts=0"),
    (ppo, dict(oracle_reward=True, gold_path="nope/gold.pkl"), "oracle_reward needs a gold"),
    (ppo, dict(reward_disagreement=0.5), "reward_disagreement=0.5: needs"),
    (seeds, dict(seeds=0), "seeds=0"),
    (grpo, dict(num_samples=1), "num_samples=1"),
    (grpo, dict(advantage="ppo"), "advantage='ppo'"),
    (grpo, dict(kl_in="both"), "kl_in='both'"),
]


@pytest.mark.parametrize("module,changes,message", INVALID,
                         ids=[f"{m.__name__.split('.')[-1]}-{list(c)[0]}" for m, c, _ in INVALID])
def test_invalid_configs_are_refused_before_any_work(module, changes, message, tmp_path):
    cfg = dataclasses.replace(module.PRESETS["tiny"], workdir=str(tmp_path / "w"), **changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        module.train(cfg)
    assert not (tmp_path / "w").exists()  # refused before creating anything


def test_all_invalid_fields_are_named_in_one_error(tmp_path):
    cfg = dataclasses.replace(ppo.PRESETS["tiny"], workdir=str(tmp_path), batch_size=-8,
                              kl_estimator="k7", learning_rate=float("nan"))
    with pytest.raises(ValueError) as e:
        ppo.train(cfg)
    for part in ("batch_size=-8", "kl_estimator='k7'", "learning_rate=nan"):
        assert part in str(e.value)


def test_dpo_raises_the_heldout_accuracy_of_its_implicit_reward(tiny_run, tmp_path):
    """DPO from the tiny SFT model on comparisons with a learnable preference (responses with
    'great' beat those with 'awful'); held-out pairs use other prompts and filler words."""
    from experiments import dpo
    cfg, _ = tiny_run
    rng = np.random.default_rng(0)
    words = ["movie", "plot", "actor", "scene", "story", "music", "ending", "camera", "script"]

    def records(split, n):
        out = []
        for i in range(n):
            a, b = rng.choice(words, 2, replace=False)
            good, bad = f" a {a} so great, {b} great.", f" a {a} so awful, {b} awful."
            flip = i % 2
            out.append({"id": f"{split}-{i}", "prompt": f"Review {split} {i}: the {b}",
                        "responses": [bad, good] if flip else [good, bad],
                        "ranks": [1, 0] if flip else [0, 1], "labeler": "rule",
                        "policies": ["a", "b"]})
        return out

    comp = tmp_path / "comparisons"
    comp.mkdir()
    for split, n in (("train", 64), ("eval", 32)):
        (comp / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records(split, n)))
    stages = pipeline.stage_configs(cfg)
    dcfg = dataclasses.replace(dpo.PRESETS["tiny"], workdir=str(tmp_path / "dpo"),
                               sft_dir=stages["reward"].sft_dir, comparisons_dir=str(comp),
                               reward_dir=stages["ppo"].reward_dir, gold_path=None,
                               data_dir=cfg.data_dir, epochs=4, batch_size=16, beta=0.5)
    summary = dpo.train(dcfg)
    before, after = summary["heldout_before"], summary["heldout"]
    assert after["eval/accuracy"] > before["eval/accuracy"] + 0.2, (before, after)
    assert after["eval/margin"] > before["eval/margin"]
    assert summary["dpo"]["kl"] > 0 and np.isfinite(summary["dpo"]["rm_score"])
    assert (tmp_path / "dpo" / "final" / "model.json").exists()
    assert (tmp_path / "dpo" / "dpo.png").stat().st_size > 0


def test_oracle_reward_scores_each_rollout_with_the_gold_scorer(tiny_run):
    """``--oracle-reward``: the PPO iteration's reward is the gold scorer's log-odds of its own
    rollouts (the host callback runs inside the program sharded over the 8 devices)."""
    from rlhf_jax.labelers import GoldSentimentScorer
    cfg, _ = tiny_run
    pcfg = dataclasses.replace(pipeline.stage_configs(cfg)["ppo"], oracle_reward=True)
    fn, state, ref_params, _, tokens, mask, tok = _ppo_iteration(cfg, pcfg)
    mesh = parallel.make_mesh()
    batch = parallel.shard_batch({"t": tokens, "m": mask}, mesh)
    _, metrics, resp, rmask = fn(parallel.replicate(state, mesh),
                                 parallel.replicate(ref_params, mesh), {}, batch["t"], batch["m"])
    gold = GoldSentimentScorer.load(pcfg.gold_path).score(decode_rows(tok, resp, rmask))
    assert float(metrics["objective/scores"]) == pytest.approx(float(np.mean(gold)), rel=1e-5)
    assert np.std(gold) > 0


def test_gold_scorer_is_loaded_once_per_file(tiny_run, tmp_path):
    """The oracle reward and the held-out gold share one load; a changed file is read again."""
    cfg, _ = tiny_run
    path = tmp_path / "gold.pkl"
    shutil.copy(pipeline.stage_configs(cfg)["ppo"].gold_path, path)
    pcfg = ppo.Config(gold_path=str(path))
    first = common.load_gold(pcfg.gold_path)
    assert common.load_gold(pcfg.gold_path) is first and first is not None
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    again = common.load_gold(pcfg.gold_path)
    assert again is not first and again.score(["a great film"]) == first.score(["a great film"])
    assert common.load_gold(str(tmp_path / "none.pkl")) is None


def test_grpo_stage_runs_vmapped_seeds_and_saves_the_first(tiny_run, tmp_path):
    """The critic-free stage over 2 vmapped seeds (the seed runner PPO's seeds use too): each seed
    is evaluated on held-out prompts, the seeds differ, the first seed's policy is the final
    bundle. Whether RLOO/GRPO learns is shown on the default task (``experiments.frontier``)."""
    cfg, _ = tiny_run
    pcfg = pipeline.stage_configs(cfg)["ppo"]
    gcfg = dataclasses.replace(
        grpo.PRESETS["tiny"], workdir=str(tmp_path / "grpo"), sft_dir=pcfg.sft_dir,
        reward_dir=pcfg.reward_dir, gold_path=pcfg.gold_path, data_dir=cfg.data_dir, seeds=2,
        iterations=3, learning_rate=2e-3, advantage="rloo", kl_in="reward")
    summary = grpo.train(gcfg)
    a, b = summary["per_seed"]
    assert summary["seeds"] == [0, 1] and a != b
    for p in (a, b):
        assert p["kl"] != 0 and 0 < p["gold"] < 1 and np.isfinite(p["rm_score"])
    assert summary["sft"]["kl"] == 0
    assert summary["ppo"]["rm_score"]["n"] == 2
    rows = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "seed1/objective/kl" in rows[-1] and "grpo/group_score_std" in rows[-1]
    # Held-out curves: the SFT policy at step 0, every eval_every and the last iteration, whose
    # evaluation is the one the summary reports.
    assert [r["step"] for r in rows if "seed1/eval/gold" in r] == [0, 2, 3]
    assert [r["step"] for r in rows if r.get("perf/eval_seconds", 0) > 0] == [2, 3]
    assert all(r["perf/iteration_seconds"] > 0 for r in rows[1:])
    assert rows[0]["eval/kl_k1"] == 0 and rows[0]["seed1/eval/gold"] == summary["sft"]["gold"]
    assert [rows[-1][f"seed{i}/eval/gold"] for i in (0, 1)] == [a["gold"], b["gold"]]
    assert rows[-1]["eval/gold"] == pytest.approx((a["gold"] + b["gold"]) / 2)
    assert (tmp_path / "grpo" / "seeds.png").stat().st_size > 0
    policy, *_ = load_bundle(tmp_path / "grpo" / "final", kind="lm")
    sft_model, *_ = load_bundle(pcfg.sft_dir, kind="lm")
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()),
                                         nnx.state(policy), nnx.state(sft_model)))
    assert max(moved) > 0
    assert "| rloo response |" in (tmp_path / "grpo" / "samples.md").read_text()


def test_reward_seeds_are_trained_apart_and_summarised(tiny_run, tmp_path):
    """``--seeds 2`` trains two reward models from the same SFT model and comparisons, each in
    its own folder; the summary's mean ± CI is over their held-out accuracies, and ``final/`` is
    the first seed's model."""
    cfg, _ = tiny_run
    rcfg = pipeline.stage_configs(cfg)["reward"]
    scfg = dataclasses.replace(rcfg, workdir=str(tmp_path / "rm"), seeds=2, seed=4)
    summary = reward.train(scfg)
    assert summary["seeds"] == [4, 5] and len(summary["per_seed"]) == 2
    acc = [p["eval/accuracy_vs_labeler"] for p in summary["per_seed"]]
    across = summary["reward"]["eval/accuracy_vs_labeler"]
    assert across["n"] == 2 and across["values"] == acc
    assert summary["eval/accuracy_vs_labeler"] == pytest.approx(np.mean(acc))
    seed4, seed5 = (load_bundle(tmp_path / "rm" / f"seed{s}" / "final", kind="scalar")[0]
                    for s in (4, 5))
    final = load_bundle(tmp_path / "rm" / "final", kind="scalar")[0]
    for a, b in zip(jax.tree.leaves(params_of(final)), jax.tree.leaves(params_of(seed4))):
        np.testing.assert_array_equal(a, b)
    diff = [float(np.abs(a - b).max()) for a, b in
            zip(jax.tree.leaves(params_of(seed4)), jax.tree.leaves(params_of(seed5)))]
    assert max(diff) > 0  # two seeds, two models
    # Re-running keeps both finished seeds and gives the same summary.
    assert reward.train(scfg)["per_seed"] == summary["per_seed"]
    # PPO's reward can be their ensemble: the mean of the two seeds' scores.
    pcfg = dataclasses.replace(pipeline.stage_configs(cfg)["ppo"],
                               reward_dir=str(tmp_path / "rm" / "seed4" / "final"),
                               reward_ensemble=(str(tmp_path / "rm" / "seed5" / "final"),))
    _, rm, _, _, tok, scorer = ppo.load_models(pcfg)
    assert isinstance(rm, ScalarEnsemble) and len(rm.members) == 2
    rng = np.random.default_rng(0)
    args = (jnp.asarray(rng.integers(3, tok.vocab_size, (3, 6))), jnp.ones((3, 6), bool),
            jnp.asarray(rng.integers(3, tok.vocab_size, (3, 4))), jnp.ones((3, 4), bool))
    single = [RewardScorer(nnx.graphdef(m), scorer.eos_id, scorer.pool)(nnx.state(m), *args)
              for m in (seed4, seed5)]
    assert float(jnp.abs(single[0] - single[1]).max()) > 1e-3
    np.testing.assert_allclose(scorer(nnx.state(rm), *args), (single[0] + single[1]) / 2,
                               atol=1e-5)


def test_pipeline_seeds_make_a_reward_ensemble_and_a_headline_over_seeds(tiny_run, tmp_path):
    """``make demo``'s preset trains 3 reward models, PPO optimises their mean minus 5 times their
    variance, over 5 seeds. The same wiring with 2 and 2 on the tiny pipeline's SFT model and
    comparisons: the headline is the mean over PPO seeds with each seed's value, and the report
    prints them."""
    default = pipeline.stage_configs(pipeline.PRESETS["default"])
    assert default["reward"].seeds == 3 and default["ppo"].seeds == 5
    assert default["ppo"].reward_disagreement == 5.0
    assert pipeline.stage_configs(pipeline.PRESETS["tiny"])["ppo"].reward_disagreement == 0
    one = dataclasses.replace(pipeline.PRESETS["default"], reward=dataclasses.replace(
        pipeline.PRESETS["default"].reward, seeds=1))  # one reward model: nothing to penalise
    one_ppo = pipeline.stage_configs(one)["ppo"]
    assert one_ppo.reward_ensemble == () and one_ppo.reward_disagreement == 0
    assert one_ppo.errors() == []
    assert default["ppo"].reward_ensemble == tuple(
        f"runs/default/reward/seed{s}/final" for s in (1, 2))
    cfg, _ = tiny_run
    src, root = common.Path(cfg.root), tmp_path / "run"
    for stage in ("sft", "collect"):
        shutil.copytree(src / stage, root / stage)
    shutil.copy(src / "gold.pkl", root / "gold.pkl")
    two = dataclasses.replace(cfg, root=str(root), reward=dataclasses.replace(cfg.reward, seeds=2),
                              ppo=dataclasses.replace(cfg.ppo, seeds=2, iterations=2,
                                                      reward_disagreement=5.0))
    summary = pipeline.train(two)
    done = json.loads((root / "ppo" / "summary.json").read_text())
    assert done["stage"] == "ppo-seeds" and done["seeds"] == [0, 1]
    assert done["config"]["reward_ensemble"] == [str(root / "reward" / "seed1" / "final")]
    assert done["config"]["reward_disagreement"] == 5.0
    gold = [s["gold"] for s in done["per_seed"]]
    assert summary["ppo_gold_positive_per_seed"] == gold
    assert summary["ppo_gold_positive"] == pytest.approx(np.mean(gold))
    assert summary["ppo_gold_positive_ci95"] > 0 or gold[0] == gold[1]
    rm = json.loads((root / "reward" / "summary.json").read_text())
    assert summary["rm_heldout_accuracy_vs_gold"] == pytest.approx(
        np.mean([s["eval/accuracy_vs_gold"] for s in rm["per_seed"]]))
    report = (root / "report.md").read_text()
    assert f"mean of 2 seeds | {np.mean(gold):.3f} |" in report
    assert " / ".join(f"{g:.3f}" for g in gold) in report and "`ppo/seeds.png`" in report
    assert (root / "ppo" / "final" / "hf" / "config.json").exists()
    # Extending the seeds' run with another learning rate is refused, naming the field.
    pcfg = pipeline.stage_configs(two)["ppo"]
    with pytest.raises(RunMismatchError, match="learning_rate"):
        seeds.train(dataclasses.replace(pcfg, iterations=3, learning_rate=2 * pcfg.learning_rate))
