"""The frontier experiment on the tiny pipeline: every method's runs, table, fits and plot (slow:
it trains 2 seeds of PPO, GRPO and DPO and samples best-of-N)."""
import dataclasses
import json
from pathlib import Path

import pytest

from experiments import frontier


@pytest.mark.slow
def test_tiny_frontier_writes_every_method_and_reuses_finished_runs(tiny_run):
    cfg, _ = tiny_run
    root = Path(cfg.root)
    fcfg = dataclasses.replace(frontier.PRESETS["tiny"], root=str(root), data_dir=cfg.data_dir,
                               iterations=2, methods=("ppo", "bon", "dpo", "grpo"))
    result = frontier.train(fcfg, argv=["--preset", "tiny"])
    methods = {t["method"] for t in result["table"]}
    assert methods == {"PPO", "best-of-N", "DPO", "GRPO"}
    for t in result["table"]:
        assert t["n"] == fcfg.seeds, t
    bon = [t for t in result["table"] if t["method"] == "best-of-N"]
    assert [t["setting"] for t in bon] == ["N=1", "N=2", "N=4", "N=8", "N=16"]
    assert bon[-1]["rm_score"]["mean"] > bon[0]["rm_score"]["mean"]  # best-of-16 by the RM
    out = root / "frontier"
    assert (out / "frontier.png").stat().st_size > 0
    md = (out / "frontier.md").read_text()
    assert "python -m experiments.frontier --preset tiny" in md and "| GRPO | β 0.1 |" in md
    assert json.loads((out / "frontier.json").read_text())["rows"] == result["rows"]
    stamps = {p: p.stat().st_mtime for p in out.glob("*/summary.json")}
    again = frontier.train(fcfg, argv=["--preset", "tiny"])  # every run is reused
    assert again["rows"] == result["rows"]
    assert stamps == {p: p.stat().st_mtime for p in out.glob("*/summary.json")}


@pytest.mark.parametrize("preset", list(frontier.PRESETS))
def test_ppo_points_use_the_adaptive_controller_at_their_target_whatever_the_stage_preset(
        preset, tmp_path):
    """The stage preset may fix β (the default does); the frontier's PPO points still sweep the
    adaptive controller's KL target, from the same initial β."""
    fcfg = frontier.PRESETS[preset]
    for target in (2.0, 20.0):
        scfg = frontier.ppo_config(fcfg, tmp_path, target)
        assert scfg.adaptive_kl and scfg.kl_target == target
        assert scfg.kl_coef == frontier.PPO_INIT_KL_COEF
        assert scfg.workdir == str(tmp_path / f"ppo_kl{target:g}")
        assert scfg.seeds == fcfg.seeds and scfg.sft_dir == f"{fcfg.root}/sft/final"
