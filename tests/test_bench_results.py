"""benchmarks/common.py: the RESULTS.md renderer (speed-ups, the machine-limit table, and
sections it must keep)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py)


def _rec(bench, case, side, median, **kw):
    return dict(bench=bench, case=case, side=side, dtype="float32", unit="s/step", median=median,
                p10=median, p90=median, runs=[median], **kw)


@pytest.fixture
def records():
    peak = dict(bench="peak", case="f32-2048", side="jax", dtype="float32", unit="FLOP/s",
                value=100e9, median=1.0, p10=1.0, p90=1.0, runs=[1.0])
    return [
        peak,
        _rec("sft", "gpt2", "trl", 15.0, flops=1.5e12),
        _rec("sft", "gpt2", "ours", 12.0, flops=1.5e12),
        _rec("ppo", "tiny", "trl", 2.0, update_s={"median": 1.0}),
        _rec("ppo", "tiny", "ours", 0.5, mfu_part={"flops": 2e10, "median": 0.4}),
    ]


def test_limit_table_divides_trl_time_by_the_flop_floor(records):
    rows = {r[0]: r for r in common._limit_rows(records)}
    # SFT: floor = 1.5e12 / 1e11 = 15 s; TRL takes 15 s -> at most 1.00x; ours 15/12 = 1.25x.
    assert rows["gpt2 sft step"][2] == common._fmt_s(15.0)
    assert rows["gpt2 sft step"][4] == "1.00×" and rows["gpt2 sft step"][7] == "1.25×"
    # PPO: the update is bounded: floor 0.2 s, TRL update 1.0 s -> 5x; ours 1.0 / 0.4 = 2.5x.
    assert rows["tiny PPO update"][4] == "5.00×" and rows["tiny PPO update"][7] == "2.50×"
    assert common._limit_rows([r for r in records if r["bench"] != "peak"]) == []


def test_rewrite_keeps_sections_it_does_not_write(records, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# old\n\n## SFT training step\n\nstale figures\n\n## Generation\n\ngen table\n"
                    "\n## NVIDIA H200 — partial run\n\ngpu figures\n")
    text = common.update_results_md(records, [], str(path))
    assert path.read_text() == text
    assert "stale figures" not in text and text.count("## SFT training step") == 1
    assert "gen table" in text and "## NVIDIA H200 — partial run\n\ngpu figures" in text
    assert "## How far a speed-up can go on this machine" in text
    assert "1.25×" in text  # the SFT speed-up row
