"""experiments.compare: seed runs' summaries side by side (table, config changes, figure)."""
import json
from pathlib import Path

import numpy as np
import pytest

from experiments import compare
from rlhf_jax import stats


def _seed_run(folder: Path, gold, kl, config: dict, evals=()):
    """A finished seed run's files, as experiments.seeds writes them."""
    folder.mkdir(parents=True)
    per_seed = [{"gold": g, "kl": k, "kl_k3": k, "rm_score": 2 * g} for g, k in zip(gold, kl)]
    (folder / "summary.json").write_text(json.dumps({
        "stage": "ppo-seeds", "seeds": list(range(len(gold))), "per_seed": per_seed,
        "sft": {"gold": 0.5, "kl": 0.0, "rm_score": 0.0},
        "config": {"workdir": str(folder), **config}}))
    rows = [{"step": s, "objective/kl": 1.0,
             **({} if g is None else {"eval/gold": g, "eval/kl_k1": k})} for s, g, k in evals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_two_runs_are_tabled_with_their_seeds_and_config_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft").mkdir()
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    _seed_run(a, [0.90, 0.92, 0.91], [9.0, 10.0, 11.0],
              {"kl_coef": 0.1, "adaptive_kl": True, "sft_dir": "sft"},
              evals=[(0, 0.5, 0.0), (10, None, None), (20, 0.91, 10.0)])
    # The same SFT folder named by its absolute path is not a change; kl_coef and adaptive_kl are.
    _seed_run(b, [0.93, 0.95], [12.0, 12.5],
              {"kl_coef": 0.11, "adaptive_kl": False, "sft_dir": str(tmp_path / "sft")})
    argv = ["--runs", str(a), str(b), "--labels", "adaptive β", "fixed"]  # as the shell split them
    out = compare.train(compare.Config(runs=(str(a), str(b)), labels=("adaptive β", "fixed"),
                                       out=str(tmp_path / "cmp")), argv=argv)
    first, second = out["rows"]
    assert first["gold"]["mean"] == pytest.approx(0.91)
    assert first["kl"] == stats.mean_ci([9.0, 10.0, 11.0])
    assert second["rm_score"]["values"] == pytest.approx([1.86, 1.90])
    assert first["changes"] == []
    assert second["changes"] == ["adaptive_kl: True → False", "kl_coef: 0.1 → 0.11"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    half = stats.mean_ci([0.90, 0.92, 0.91])["half_width"]
    assert f"| adaptive β | 3 | 0.910 ± {half:.3f} | 0.900 / 0.920 / 0.910 |" in md
    assert "| fixed | 2 | 0.940 ± " in md and "12.00 / 12.50" in md
    assert "`adaptive_kl: True → False`; `kl_coef: 0.1 → 0.11`" in md
    assert f"python -m experiments.compare --runs {a} {b} --labels 'adaptive β' fixed`" in md
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][1]["seeds"] == [0, 1]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert [r["eval/gold"] for r in compare.load_run(a)["evals"]] == [0.5, 0.91]


def test_one_seed_has_no_interval_and_prints_no_spread(tmp_path):
    a = tmp_path / "a"
    _seed_run(a, [0.9], [10.0], {"kl_coef": 0.1})
    run = compare.load_run(a)
    rows = compare.table([run], ["one"])
    assert np.isnan(rows[0]["gold"]["half_width"])
    assert "| one | 1 | 0.900 | 0.900 |" in compare.markdown(rows, [])
    # A "|" in a label is escaped: the row keeps its 2 + 2 * len(FIGURES) cells.
    md = compare.markdown(compare.table([run], ["β|0.1\nfixed"]), [])
    [row] = [line for line in md.splitlines() if line.startswith("| β")]
    assert row.startswith("| β\\|0.1 fixed | 1 | ") and "run (β\\|0.1 fixed, `" in md
    assert len(row.replace("\\|", "").split("|")) - 2 == 2 + 2 * len(compare.FIGURES)
    assert compare.plot([run], rows, tmp_path).stat().st_size > 10_000  # no error bar, no path


def test_a_run_without_a_gold_scorer_is_tabled_but_not_plotted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _seed_run(a, [0.9, 0.8], [10.0, 9.0], {"kl_coef": 0.1})
    _seed_run(b, [0.9, 0.8], [10.0, 9.0], {"kl_coef": 0.1, "gold_path": None})
    summary = json.loads((b / "summary.json").read_text())
    for p in summary["per_seed"]:
        p["gold"] = None
    (b / "summary.json").write_text(json.dumps(summary))
    runs = [compare.load_run(a), compare.load_run(b)]
    rows = compare.table(runs, ["gold", "no gold"])
    assert rows[1]["gold"] is None and rows[1]["kl"]["values"] == [10.0, 9.0]
    assert "| no gold | 2 | — | — | 9.50 ± " in compare.markdown(rows, [])
    assert rows[1]["changes"] == ["gold_path: (not set) → None"]
    assert compare.plot(runs, rows, tmp_path).exists()


@pytest.mark.parametrize("case, message", [
    ("labels", "1 labels for 2 runs"),
    ("missing", "summary.json: not found"),
    ("single", "no seeds, per_seed; expected the summary of a finished seed run (experiments."
               "seeds), got stage 'ppo'"),
    ("none", "no runs given"),
])
def test_bad_input_is_refused_with_the_file_and_what_was_expected(tmp_path, case, message):
    a, b = tmp_path / "a", tmp_path / "b"
    _seed_run(a, [0.9, 0.8], [10.0, 9.0], {"kl_coef": 0.1})
    runs, labels = (str(a), str(b)), ()
    if case == "labels":
        _seed_run(b, [0.9, 0.8], [10.0, 9.0], {"kl_coef": 0.1})
        labels = ("only one",)
    elif case == "single":  # experiments.ppo's one-run summary
        b.mkdir()
        (b / "summary.json").write_text(json.dumps({"stage": "ppo", "config": {}, "sft": {}}))
    elif case == "none":
        runs = ()
    with pytest.raises(SystemExit, match="compare: .*" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        compare.train(compare.Config(runs=runs, labels=labels, out=str(tmp_path / "cmp")),
                      argv=[])
    if case == "missing":
        with pytest.raises(SystemExit, match=str(b / "summary.json")):
            compare.train(compare.Config(runs=runs, out=str(tmp_path / "cmp")), argv=[])
