"""The whole human path, unattended: the tiny pipeline's SFT models -> collect export -> serve ->
two simulated labelers over HTTP -> export -> collect import -> the reward stage trains on it."""
import dataclasses
import json
import threading

from labeling_helpers import ProcessServer

from rlhf_jax.data import comparisons
from rlhf_jax.labeling.__main__ import main
from rlhf_jax.labeling.client import GoldLookup, LabelingClient, simulate


def test_collect_export_serve_simulate_export_import_reward(tiny_run, tmp_path):
    from experiments import collect, pipeline, reward

    cfg, _ = tiny_run  # the session's tiny pipeline: its SFT models, gold scorer and IMDB build
    stages = pipeline.stage_configs(cfg)
    sft_final = stages["reward"].sft_dir
    base = dataclasses.replace(stages["collect"], workdir=str(tmp_path / "collect"),
                               train_prompts=8, eval_prompts=4)
    assert collect.train(dataclasses.replace(base, labeler="export"))["stopped_at"] == \
        "waiting for rankings"

    srv = ProcessServer([tmp_path / "collect", "--labels-per-item", "2"],
                        log_path=tmp_path / "server.log").start()
    gold = GoldLookup.from_scorer(base.gold_path)
    results, errors = {}, []

    def run(name, seed):
        try:
            with LabelingClient(srv.url, labeler=name) as client:
                results[name] = simulate(client, gold, labeler=name, temperature=0.5, seed=seed)
        except BaseException as e:
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=run, args=(f"sim{i}", i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        assert all(r.ranked == 12 for r in results.values())  # every item, by both
        assert main(["export", str(tmp_path / "collect"), "--out",
                     str(tmp_path / "ranked")]) == 0
    finally:
        srv.stop()
    exported = comparisons.read_comparisons(tmp_path / "ranked" / "train.jsonl")
    assert len(exported) == 16 and {r["id"].split("#")[1] for r in exported} == {"sim0", "sim1"}

    summary = collect.train(dataclasses.replace(base, labeler="import",
                                                rankings_file=str(tmp_path / "ranked")))
    assert summary["train_comparisons"] == 16 and summary["eval_comparisons"] == 8
    out = reward.train(dataclasses.replace(reward.PRESETS["tiny"],
                                           workdir=str(tmp_path / "reward"),
                                           sft_dir=sft_final,
                                           comparisons_dir=str(tmp_path / "collect")))
    assert (tmp_path / "reward" / "final").is_dir()
    rows = [json.loads(x) for x in open(tmp_path / "reward" / "metrics.jsonl")]
    assert rows and out
