"""Kendall's τ-b (hand-computed cases, SciPy) and the agreement report."""
import math

import numpy as np
import pytest

from rlhf_jax.labeling.agreement import agreement_report, gold_pair_agreement, kendall_tau_b
from rlhf_jax.labeling.store import LabelRow


def test_kendall_tau_b_hand_computed():
    # One swapped pair out of 6: (5 concordant - 1 discordant) / 6.
    assert kendall_tau_b([0, 1, 2, 3], [0, 2, 1, 3]) == pytest.approx(2 / 3)
    # Ties. Pairs of x=[0,0,1,2], y=[0,1,1,2]: (0,1) tied in x, (1,2) tied in y, the other 4
    # concordant -> 4 / sqrt((6-1)(6-1)) = 0.8.
    assert kendall_tau_b([0, 0, 1, 2], [0, 1, 1, 2]) == pytest.approx(0.8)
    # Reversed; with a tie in x: pairs (0,1) tied, 2 discordant -> -2 / sqrt(2 * 3).
    assert kendall_tau_b([0, 1, 2], [2, 1, 0]) == pytest.approx(-1.0)
    assert kendall_tau_b([0, 0, 1], [2, 1, 0]) == pytest.approx(-2 / math.sqrt(6))
    assert math.isnan(kendall_tau_b([0, 0, 0], [0, 1, 2]))  # undefined: all tied


def test_kendall_tau_b_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(2, 7))
        x, y = rng.integers(0, 3, k), rng.normal(size=k).round(1)
        ours = kendall_tau_b(x, y)
        ref = stats.kendalltau(x, y, variant="b").statistic
        assert (math.isnan(ours) and math.isnan(ref)) or ours == pytest.approx(ref), (x, y)


def test_kendall_tau_b_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one length"):
        kendall_tau_b([0, 1], [0, 1, 2])


def test_gold_pair_agreement():
    # Gold prefers 2 > 1 > 0; the ranking puts 2 first, ties 0 and 1 -> 2 untied pairs, both
    # ordered like gold.
    assert gold_pair_agreement([1, 1, 0], [0.0, 1.0, 2.0]) == (2, 2)
    assert gold_pair_agreement([0, 1, 2], [0.0, 1.0, 2.0]) == (0, 3)


def row(rid, labeler, ranks, gold=None):
    rec = {"id": rid, "prompt": "p", "responses": ["a", "b", "c"], "policies": ["x", "y", "z"]}
    if gold is not None:
        rec["gold_scores"] = gold
    return LabelRow(seq=0, split="train", rid=rid, labeler=labeler, ranks=ranks,
                    submission_id="s" * 8, created_at=0.0, record=rec)


def test_agreement_report_hand_computed():
    gold = [0.0, 1.0, 2.0]  # best is response 2
    rows = [row("i1", "ann", [2, 1, 0], gold), row("i1", "bob", [2, 1, 0], gold),
            row("i2", "ann", [0, 1, 2], gold), row("i2", "bob", [1, 0, 2], gold),
            row("i3", "ann", [0, 0, 1]), row("i3", "cid", [0, 0, 0])]
    rep = agreement_report(rows, {"cid": 4})
    by = {r["labeler"]: r for r in rep["labelers"]}
    assert by["ann"]["rankings"] == 3 and by["cid"]["skips"] == 4
    assert by["ann"]["gold_items"] == 2
    assert by["ann"]["gold_mean_tau_b"] == pytest.approx(0.0)  # (+1 + -1) / 2
    assert by["ann"]["gold_pair_agreement"] == pytest.approx(3 / 6)
    assert by["bob"]["gold_mean_tau_b"] == pytest.approx((1 + -1 / 3) / 2)
    assert by["cid"]["gold_items"] == 0 and by["cid"]["gold_mean_tau_b"] is None
    pairs = {(p["a"], p["b"]): p for p in rep["pairs"]}
    ab = pairs[("ann", "bob")]
    assert ab["shared_items"] == 2 and ab["tau_items"] == 2
    assert ab["mean_tau_b"] == pytest.approx((1 + 1 / 3) / 2)  # i2: one of 3 pairs swapped
    assert ab["exact_agreement"] == pytest.approx(0.5)
    ac = pairs[("ann", "cid")]
    assert ac["shared_items"] == 1 and ac["tau_items"] == 0 and ac["mean_tau_b"] is None
    assert ("bob", "cid") not in pairs  # nothing shared
    assert rep["items"] == {"ranked": 3, "multiply_ranked": 3}
    assert rep["gold"]["items"] == 4
