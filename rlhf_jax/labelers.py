"""Labelers for comparisons: a gold sentiment scorer and a simulated (noisy) labeler built on it.

The embedded default task needs someone to rank K responses per prompt. Humans can (export the
samples, import the ranks: :mod:`rlhf_jax.data`); by default a *simulated labeler* does, built on a
**gold scorer** that is independent of the reward model being trained:

* :class:`GoldSentimentScorer` — TF-IDF (word 1–2-grams) + logistic regression trained on IMDB
  review
  labels. ``score(texts)`` is the log-odds of "positive"; ``prob(texts)`` is P(positive). It reads
  text,
  not tokens, so it is blind to the policy's tokenizer and cannot be exploited through it.
* :func:`simulated_ranks` — every pair (a, b) of the K responses is compared once with Bradley–Terry
  noise, ``P(a ≻ b) = σ((g_a − g_b) / τ)``, and responses are ranked by their number of wins
  (0 = best; equal wins = tie). Each pairwise label thus follows exactly the Bradley–Terry model the
  reward model assumes; ``τ → 0`` gives the gold ordering.
"""
from __future__ import annotations

import os
from pathlib import Path
import pickle
from typing import Sequence

import numpy as np


class GoldSentimentScorer:
    """TF-IDF + logistic-regression sentiment classifier (scikit-learn)."""

    def __init__(self, pipeline):
        self._pipeline = pipeline

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int], c: float = 4.0,
            max_features: int = 200_000) -> "GoldSentimentScorer":
        """Fits on labelled reviews (label 1 = positive)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        labels = np.asarray(labels)
        if len(texts) != len(labels) or not set(np.unique(labels)) <= {0, 1}:
            raise ValueError(f"need one 0/1 label per text; got {len(texts)} texts, labels "
                             f"{np.unique(labels)[:5]} (len {len(labels)})")
        pipe = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=max_features,
                            sublinear_tf=True, strip_accents="unicode"),
            LogisticRegression(C=c, max_iter=1000))
        pipe.fit(list(texts), labels)
        return cls(pipe)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Log-odds of positive sentiment, ``[N]`` float32."""
        return self._pipeline.decision_function(list(texts)).astype(np.float32)

    def prob(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive), ``[N]`` float32."""
        return (1.0 / (1.0 + np.exp(-self.score(texts)))).astype(np.float32)

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        return float(np.mean((self.score(texts) > 0) == (np.asarray(labels) == 1)))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the pickle atomically (a temporary sibling renamed into place): a run killed
        while saving never leaves a truncated scorer behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(self._pipeline, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GoldSentimentScorer":
        with open(path, "rb") as f:
            return cls(pickle.load(f))


def ranks_from_wins(wins_bk: np.ndarray) -> np.ndarray:
    """Dense ranks from win counts: 0 for the most wins, equal wins share a rank. ``[B,K]``
    int32."""
    wins_bk = np.asarray(wins_bk)
    if wins_bk.ndim != 2:
        raise ValueError(f"wins must be [B, K]; got shape {wins_bk.shape}")
    out = np.empty(wins_bk.shape, np.int32)
    for b, row in enumerate(wins_bk):
        levels = np.unique(row)[::-1]  # distinct win counts, best first
        out[b] = np.searchsorted(-levels, -row)
    return out


def simulated_ranks(gold_bk: np.ndarray, temperature: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Rankings of K responses per prompt by a Bradley–Terry-noisy labeler.

    Args:
      gold_bk: ``[B, K]`` gold scores (log-odds) of each response.
      temperature: τ in ``P(a ≻ b) = σ((g_a − g_b)/τ)``; 0 means noiseless (ties only on equal
        gold).
      rng: numpy Generator (explicit, so a run's labels are reproducible).

    Returns:
      ``[B, K]`` int32 ranks, 0 = best, equal = tie.
    """
    gold_bk = np.asarray(gold_bk, np.float64)
    if gold_bk.ndim != 2:
        raise ValueError(f"gold scores must be [B, K]; got shape {gold_bk.shape}")
    b, k = gold_bk.shape
    diff = gold_bk[:, :, None] - gold_bk[:, None, :]  # [B,K,K]: g_a - g_b
    if temperature > 0:
        p_win = 1.0 / (1.0 + np.exp(-np.clip(diff / temperature, -60, 60)))
        u = rng.random((b, k, k))
        a_wins = u < p_win
        # One draw per unordered pair: b beats a exactly when a does not beat b.
        upper = np.triu(np.ones((k, k), bool), 1)
        beats = np.where(upper, a_wins, np.swapaxes(~a_wins, 1, 2))
    else:
        beats = diff > 0
    np.einsum("bii->bi", beats)[...] = False
    return ranks_from_wins(beats.sum(axis=2))
