"""Statistics for reporting RLHF runs: confidence intervals over seeds, best-of-n sampling (its
analytic KL and an unbiased estimate of its expected scores) and the reward-model over-optimisation
frontier of Gao et al. 2022.

Plain NumPy/SciPy on host values (floats, lists, NumPy arrays), not JAX: these run after training,
on a handful of numbers per run.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import special
from scipy import stats as sps

__all__ = [
    "mean_ci",
    "flatten_metrics",
    "summarize_seeds",
    "best_of_n_kl",
    "best_of_n_weights",
    "best_of_n_expectation",
    "gao_bon",
    "gao_rl",
    "fit_bon",
    "fit_rl",
    "peak_bon",
    "peak_rl",
    "overoptimization_point",
]


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------
def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ``n`` independent runs (e.g. seeds) with a Student-t confidence interval::

        s = sqrt(Σ (x_i − x̄)² / (n − 1)),   half_width = t_{(1+c)/2, n−1} · s / √n
        CI = [x̄ − half_width, x̄ + half_width]

    With one value the spread, hence the interval, is undefined: ``std``, ``half_width``,
    ``ci_low`` and ``ci_high`` are NaN (not 0, which would claim certainty). A NaN among the values
    propagates to every statistic.

    Args:
      values: ``[n]`` numbers (anything ``np.asarray`` flattens), n ≥ 1.
      confidence: c in (0, 1), the coverage of the interval.

    Returns:
      dict with ``mean``, ``ci_low``, ``ci_high``, ``half_width``, ``std`` (sample std, ``ddof=1``)
      as floats, ``n`` and ``values`` (the inputs as a list of floats).
    """
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_ci: `values` is empty; expected at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"mean_ci: `confidence` is {confidence}; expected a value in (0, 1)")
    n = int(x.size)
    mean = float(np.mean(x))
    if n < 2:
        std = half = math.nan
    else:
        std = float(np.std(x, ddof=1))
        half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "half_width": half,
            "std": std, "n": n, "values": [float(v) for v in x]}


def _is_number(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, numbers.Real):
        return True
    # NumPy / JAX scalars and 0-d arrays of a numeric dtype
    shape, dtype = getattr(v, "shape", None), getattr(v, "dtype", None)
    return shape == () and dtype is not None and np.issubdtype(dtype, np.number)


def flatten_metrics(d: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Flattens nested dicts: ``{"eval": {"kl": 3}}`` → ``{"eval/kl": 3}`` (leaves unchanged)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, sep, key))
        else:
            out[key] = v
    return out


def summarize_seeds(runs: Sequence[Mapping[str, Any]], confidence: float = 0.95,
                    sep: str = "/") -> dict[str, dict[str, Any]]:
    """:func:`mean_ci` of every numeric headline metric across runs (one dict per seed).

    Nested dicts are flattened with ``sep`` (``{"eval": {"gold": …}}`` → ``"eval/gold"``);
    non-numeric leaves (strings, lists, booleans, None) are skipped. A key missing from some runs
    is summarised over the runs that have it (its ``n`` says how many).

    Args:
      runs: the per-seed summaries, e.g. the ``summary.json`` of each seed.
      confidence: passed to :func:`mean_ci`.
      sep: separator of flattened keys.

    Returns:
      ``{key: mean_ci(values of key)}`` in order of first appearance.
    """
    if isinstance(runs, Mapping):
        raise TypeError("summarize_seeds: `runs` is a dict; expected a list of per-seed dicts")
    values: dict[str, list[float]] = {}
    for run in runs:
        for k, v in flatten_metrics(run, sep).items():
            if _is_number(v):
                values.setdefault(k, []).append(float(v))
    return {k: mean_ci(v, confidence) for k, v in values.items()}


# --------------------------------------------------------------------------------------------
# Best-of-n
# --------------------------------------------------------------------------------------------
def best_of_n_kl(n: int | float | np.ndarray) -> float | np.ndarray:
    """KL(π_bon ‖ π) of best-of-n sampling from a base policy π (Hilton & Gao 2022, "Measuring
    Goodhart's law", OpenAI blog; Gao et al. 2022, arXiv:2210.10760, §2)::

        KL_bon = log n − (n − 1)/n

    exact when the scores have a continuous distribution (the best of n has density
    ``n·F^{n−1}`` relative to the base), an upper bound for discrete ones (ties).

    Args:
      n: number of samples n ≥ 1, scalar or array.

    Returns:
      KL in nats, like ``n`` (a float for a scalar).
    """
    n_arr = np.asarray(n, np.float64)
    if np.any(~(n_arr >= 1)):
        raise ValueError(f"best_of_n_kl: `n` is {n}; expected n ≥ 1")
    kl = np.log(n_arr) - (n_arr - 1.0) / n_arr
    return float(kl) if kl.ndim == 0 else kl


def best_of_n_weights(m: int, n: int) -> np.ndarray:
    """Probability that the i-th smallest of m values is the largest of a uniformly random
    n-subset::

        w_i = C(i, n−1) / C(m, n),   i = 0 … m−1 (0-based, ascending)

    (the other n − 1 members must all come from the i smaller values); ``Σ_i w_i = 1``. Computed
    with log-gamma, so large m (thousands) neither overflows nor loses the small weights.

    Args:
      m: number of samples, m ≥ n.
      n: subset size, n ≥ 1.

    Returns:
      ``[m]`` float64 weights.
    """
    if not (isinstance(m, numbers.Integral) and isinstance(n, numbers.Integral)) or not 1 <= n <= m:
        raise ValueError(f"best_of_n_weights: (m, n) = ({m}, {n}); expected integers with "
                         "1 ≤ n ≤ m")
    i = np.arange(m, dtype=np.float64)
    ok = i >= n - 1
    log_c = (special.gammaln(i + 1) - special.gammaln(n) -
             special.gammaln(np.where(ok, i - n + 2, 1.0)))
    log_total = special.gammaln(m + 1) - special.gammaln(n + 1) - special.gammaln(m - n + 1)
    w = np.where(ok, np.exp(np.where(ok, log_c - log_total, 0.0)), 0.0)
    return w / w.sum()


def best_of_n_expectation(proxy_scores: np.ndarray, n: int,
                          gold_scores: np.ndarray | None = None) -> dict[str, Any]:
    """Unbiased estimate of the expected scores of best-of-n sampling, from m ≥ n samples per
    prompt (Hilton & Gao 2022, "Measuring Goodhart's law"; used for the best-of-n curves of Gao
    et al. 2022).

    For each prompt the m samples are sorted by proxy score; sample i (0-based, ascending) is the
    proxy's pick of a uniformly random n-subset with probability ``w_i`` (:func:`best_of_n_weights`)
    so ::

        E[proxy of the best-of-n] = Σ_i w_i · proxy_(i),    E[gold of it] = Σ_i w_i · gold_(i)

    which averages over all C(m, n) subsets at once instead of sampling some. Ties in the proxy are
    broken uniformly at random: the gold scores of tied samples are averaged before weighting
    (exact, since tied samples are equally likely to be picked).

    Args:
      proxy_scores: ``[P, M]`` reward-model (proxy) scores of M samples for each of P prompts.
      n: best-of-n, 1 ≤ n ≤ M.
      gold_scores: optional ``[P, M]`` gold scores of the same samples.

    Returns:
      dict with ``n``, ``kl`` (:func:`best_of_n_kl`), ``proxy`` (mean over prompts) and
      ``proxy_per_prompt`` ``[P]``, and with gold scores ``gold`` and ``gold_per_prompt``.
    """
    proxy = np.asarray(proxy_scores, np.float64)
    if proxy.ndim != 2:
        raise ValueError(f"best_of_n_expectation: `proxy_scores` has shape {proxy.shape}; "
                         "expected [P, M]")
    p, m = proxy.shape
    w = best_of_n_weights(m, n)
    order = np.argsort(proxy, axis=1, kind="stable")
    proxy_sorted = np.take_along_axis(proxy, order, axis=1)
    out: dict[str, Any] = {"n": n, "kl": best_of_n_kl(n)}
    per_prompt = proxy_sorted @ w
    out.update(proxy=float(per_prompt.mean()), proxy_per_prompt=per_prompt)
    if gold_scores is not None:
        gold = np.asarray(gold_scores, np.float64)
        if gold.shape != proxy.shape:
            raise ValueError(f"best_of_n_expectation: `gold_scores` has shape {gold.shape}; "
                             f"expected the shape of `proxy_scores` {proxy.shape}")
        gold_sorted = np.take_along_axis(gold, order, axis=1)
        # tie groups of equal proxy scores: ids 0, 1, … along each row, made unique across rows
        new_group = np.concatenate([np.ones((p, 1), bool), np.diff(proxy_sorted, axis=1) != 0],
                                   axis=1)
        ids = (np.cumsum(new_group, axis=1) - 1 + m * np.arange(p)[:, None]).ravel()
        sums = np.bincount(ids, weights=gold_sorted.ravel(), minlength=p * m)
        counts = np.bincount(ids, minlength=p * m)
        gold_tied = (sums[ids] / counts[ids]).reshape(p, m)
        per_prompt_gold = gold_tied @ w
        out.update(gold=float(per_prompt_gold.mean()), gold_per_prompt=per_prompt_gold)
    return out


# --------------------------------------------------------------------------------------------
# Over-optimisation frontier (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
# Overoptimization", arXiv:2210.10760, eqs. 1-2)
# --------------------------------------------------------------------------------------------
def gao_bon(d: float | np.ndarray, alpha: float, beta: float) -> float | np.ndarray:
    """Gold reward of best-of-n vs ``d = sqrt(KL)``: ``R(d) = d·(α − β·d)`` (Gao et al. eq. 1)."""
    return np.asarray(d, np.float64) * (alpha - beta * np.asarray(d, np.float64))


def gao_rl(d: float | np.ndarray, alpha: float, beta: float) -> float | np.ndarray:
    """Gold reward of RL vs ``d = sqrt(KL)``: ``R(d) = d·(α − β·log d)`` (Gao et al. eq. 2), with
    ``R(0) = 0`` (the limit)."""
    d = np.asarray(d, np.float64)
    pos = d > 0
    return np.where(pos, d * (alpha - beta * np.log(np.where(pos, d, 1.0))), 0.0)


def _fit(fn: str, d: Any, r: Any, feature) -> tuple[float, float]:
    d = np.asarray(d, np.float64).ravel()
    r = np.asarray(r, np.float64).ravel()
    if d.shape != r.shape:
        raise ValueError(f"{fn}: `d` has shape {d.shape} and `r` {r.shape}; expected equal")
    if np.any(d < 0) or not np.all(np.isfinite(d)) or not np.all(np.isfinite(r)):
        raise ValueError(f"{fn}: `d` must be finite and ≥ 0 (d = sqrt(KL)) and `r` finite")
    keep = d > 0  # R(0) = 0 carries no information about α, β
    d, r = d[keep], r[keep]
    design = np.stack([d, -feature(d)], axis=1)
    if d.size < 2 or np.linalg.matrix_rank(design) < 2:
        raise ValueError(f"{fn}: need at least two points with distinct d > 0 to fit α, β")
    (alpha, beta), *_ = np.linalg.lstsq(design, r, rcond=None)
    return float(alpha), float(beta)


def fit_bon(d: Sequence[float] | np.ndarray,
            r: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Least-squares fit of the best-of-n form ``R = d·(α − β·d) = α·d − β·d²`` (Gao et al. eq. 1).

    The form is linear in (α, β), so this is ordinary linear least squares on the rewards (the
    residuals are in reward units, so small-d points are not amplified as they would be when
    fitting ``R/d``). Points with ``d = 0`` are dropped: the form is 0 there whatever α, β.
    ``r`` should be measured relative to the initial policy (``R(0) = 0``), e.g. the gold score
    minus the gold score of the base policy.

    Args:
      d: ``[N]`` ``sqrt(KL)`` of each point, ≥ 0.
      r: ``[N]`` gold reward (relative to the initial policy).

    Returns:
      ``(alpha, beta)``.
    """
    return _fit("fit_bon", d, r, lambda x: x * x)


def fit_rl(d: Sequence[float] | np.ndarray,
           r: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Least-squares fit of the RL form ``R = d·(α − β·log d) = α·d − β·d·log d`` (Gao et al.
    eq. 2); see :func:`fit_bon` for the conventions.

    Args:
      d: ``[N]`` ``sqrt(KL)`` of each point, ≥ 0.
      r: ``[N]`` gold reward (relative to the initial policy).

    Returns:
      ``(alpha, beta)``.
    """
    return _fit("fit_rl", d, r, lambda x: x * np.log(x))


def peak_bon(alpha: float, beta: float) -> float:
    """``d* = argmax_d d·(α − β·d) = α / (2β)`` (the KL there is ``d*²``), clipped at 0 when
    α ≤ 0; ``inf`` when β ≤ 0 (the curve never turns down)."""
    if not beta > 0:
        return math.inf
    return max(alpha / (2.0 * beta), 0.0)


def peak_rl(alpha: float, beta: float) -> float:
    """``d* = argmax_d d·(α − β·log d) = exp(α/β − 1)`` (from ``α − β·log d − β = 0``; the KL
    there is ``d*²`` and the peak reward ``β·d*``); ``inf`` when β ≤ 0."""
    if not beta > 0:
        return math.inf
    try:
        return math.exp(alpha / beta - 1.0)
    except OverflowError:
        return math.inf


def overoptimization_point(kl: Sequence[float] | np.ndarray, gold: Sequence[float] | np.ndarray,
                           proxy: Sequence[float] | np.ndarray) -> float | None:
    """The KL at which the gold reward peaks while the proxy keeps rising (Goodhart's point).

    Points are sorted by KL; the peak is the first maximum of the gold score. Over-optimisation
    means the gold score ends below that peak while the proxy score ends above its value there.
    Returns ``None`` when the gold never turns down (monotone, or flat at its maximum) or when the
    proxy falls as well (then the run degraded on both, which is not reward hacking).

    Args:
      kl: ``[N]`` KL(π ‖ π_ref) of each checkpoint (or best-of-n).
      gold: ``[N]`` gold scores.
      proxy: ``[N]`` proxy (reward-model) scores.

    Returns:
      The KL of the gold peak, or ``None``.
    """
    kl = np.asarray(kl, np.float64).ravel()
    gold = np.asarray(gold, np.float64).ravel()
    proxy = np.asarray(proxy, np.float64).ravel()
    if not kl.shape == gold.shape == proxy.shape:
        raise ValueError(f"overoptimization_point: `kl`, `gold` and `proxy` have shapes "
                         f"{kl.shape}, {gold.shape}, {proxy.shape}; expected equal")
    if kl.size < 2:
        return None
    order = np.argsort(kl, kind="stable")
    kl, gold, proxy = kl[order], gold[order], proxy[order]
    i = int(np.argmax(gold))
    if gold[-1] < gold[i] and proxy[-1] > proxy[i]:
        return float(kl[i])
    return None
