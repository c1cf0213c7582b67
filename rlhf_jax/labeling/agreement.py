"""Agreement between labelers, and with the gold scorer: Kendall's τ-b on each shared item.

For two rankings ``x``, ``y`` of the same K responses (ties allowed), over the ``K(K-1)/2`` pairs
``(i, j)``: ``n_c`` concordant (both order the pair the same way), ``n_d`` discordant, ``t_x``
pairs tied in ``x`` only-or-both, ``t_y`` likewise in ``y``::

    τ_b = (n_c - n_d) / sqrt((n_0 - t_x) (n_0 - t_y)),   n_0 = K(K-1)/2

τ_b is 1 for identical orders, -1 for reversed ones, and undefined (NaN, left out of means) when
either ranking ties every response. Ranks are "lower is better" and gold scores "higher is
better", so agreement with gold is ``τ_b(ranks, -gold)``. The report also gives the *pair
agreement*: the fraction of pairs the labeler did not tie whose order matches the gold order (the
number the collect stage reports for the simulated labeler).
"""
from __future__ import annotations

import collections
import itertools
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from rlhf_jax.labeling.store import LabelRow


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of two equally long score or rank vectors; NaN when undefined.

    Raises:
      ValueError: when the lengths differ or fewer than 2 values are given.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau_b needs two 1-D vectors of one length, got shapes "
                         f"{x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"kendall_tau_b needs at least 2 values, got {x.size}")
    i, j = np.triu_indices(x.size, 1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = i.size
    s = float(np.sum(sx * sy))  # n_c - n_d
    tx, ty = int(np.sum(sx == 0)), int(np.sum(sy == 0))
    denom = math.sqrt((n0 - tx) * (n0 - ty))
    return s / denom if denom > 0 else float("nan")


def gold_pair_agreement(ranks: Sequence[int], gold: Sequence[float]) -> tuple[int, int]:
    """``(agreeing, untied)``: pairs the ranking does not tie, and those ordered like gold."""
    r, g = np.asarray(ranks), np.asarray(gold, np.float64)
    i, j = np.triu_indices(r.size, 1)
    untied = r[i] != r[j]
    agree = (r[i] < r[j]) == (g[i] > g[j])
    return int(np.sum(agree & untied)), int(np.sum(untied))


def _mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def agreement_report(labels: Sequence[LabelRow], skips: Mapping[str, int] | None = None) -> dict:
    """Counts per labeler, pairwise labeler agreement and agreement with gold.

    Returns (JSON-ready; means are ``None`` where nothing was defined)::

      {"labelers": [{"labeler", "rankings", "skips", "gold_items", "gold_mean_tau_b",
                     "gold_pair_agreement"}],
       "pairs": [{"a", "b", "shared_items", "tau_items", "mean_tau_b", "exact_agreement"}],
       "gold": {"items", "mean_tau_b", "pair_agreement"},
       "items": {"ranked", "multiply_ranked"}}

    ``shared_items`` counts items both labelers ranked; ``tau_items`` those where τ-b is defined;
    ``exact_agreement`` the fraction of shared items ranked identically.
    """
    skips = dict(skips or {})
    by_item: dict[tuple[str, str], dict[str, LabelRow]] = collections.defaultdict(dict)
    by_labeler: dict[str, list[LabelRow]] = collections.defaultdict(list)
    for row in labels:
        by_item[(row.split, row.rid)][row.labeler] = row
        by_labeler[row.labeler].append(row)

    gold_tau_all: list[float] = []
    gold_pairs_all = [0, 0]
    labelers = []
    for name in sorted(set(by_labeler) | set(skips)):
        taus, pairs = [], [0, 0]
        for row in by_labeler.get(name, []):
            gold = row.record.get("gold_scores")
            if gold is None:
                continue
            taus.append(kendall_tau_b(row.ranks, [-g for g in gold]))
            a, n = gold_pair_agreement(row.ranks, gold)
            pairs[0] += a
            pairs[1] += n
        gold_tau_all += taus
        gold_pairs_all[0] += pairs[0]
        gold_pairs_all[1] += pairs[1]
        labelers.append({"labeler": name, "rankings": len(by_labeler.get(name, [])),
                         "skips": skips.get(name, 0), "gold_items": len(taus),
                         "gold_mean_tau_b": _mean(taus),
                         "gold_pair_agreement": pairs[0] / pairs[1] if pairs[1] else None})

    pair_rows = []
    for a, b in itertools.combinations(sorted(by_labeler), 2):
        shared = [(rows[a], rows[b]) for rows in by_item.values() if a in rows and b in rows]
        if not shared:
            continue
        taus = [kendall_tau_b(ra.ranks, rb.ranks) for ra, rb in shared]
        pair_rows.append({"a": a, "b": b, "shared_items": len(shared),
                          "tau_items": sum(not math.isnan(t) for t in taus),
                          "mean_tau_b": _mean(taus),
                          "exact_agreement": float(np.mean([ra.ranks == rb.ranks
                                                            for ra, rb in shared]))})
    return {
        "labelers": labelers,
        "pairs": pair_rows,
        "gold": {"items": len(gold_tau_all), "mean_tau_b": _mean(gold_tau_all),
                 "pair_agreement": (gold_pairs_all[0] / gold_pairs_all[1]
                                    if gold_pairs_all[1] else None)},
        "items": {"ranked": len(by_item),
                  "multiply_ranked": sum(len(v) > 1 for v in by_item.values())},
    }
