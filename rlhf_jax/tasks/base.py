"""The :class:`Task` interface and the helpers every task shares."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from rlhf_jax.data import batching


def spread(n_total: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(n_total)`` (all when None).

    Built splits may keep a file's order (IMDB's CSV is sorted by label): a prefix would be
    one-sided.
    """
    if limit is None or limit >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, limit).round().astype(int)


class Task:
    """What a stage needs from a task. Records are mappings with a ``"text"`` field (``str`` or
    UTF-8 ``bytes``).

    Splits: ``"train"`` (SFT demonstrations; rollout and comparison prompts) and ``"eval"``
    (held-out: SFT validation loss, held-out comparisons, PPO evaluation prompts).
    """
    name: str = "task"
    prompt_keep: str = "first"
    """Which end of a long prompt to keep at ``query_len`` tokens: ``first`` (a review's opening)
    or ``last`` (a chat prompt, whose end matters)."""

    def sft_source(self, split: str, limit: int | None = None) -> Sequence[Mapping[str, Any]]:
        """Demonstrations: records whose ``text`` is a full document to learn (prompt +
        response)."""
        raise NotImplementedError

    def prompt_source(self, split: str) -> Sequence[Mapping[str, Any]]:
        """Prompts: records whose ``text`` starts a response (cut to ``query_len`` tokens)."""
        raise NotImplementedError

    def gold_scorer(self, cache_path: str | None, max_train_texts: int | None = None):
        """``(scorer, held-out accuracy)``, or ``(None, None)`` for a task without one.

        A scorer has ``score(texts) -> [N] logits`` and ``prob(texts) -> [N]`` (higher = better);
        the simulated labeler ranks by it and the stages report it, never train on it.
        """
        return None, None

    def prompt_set(self, split: str, tokenizer, query_len: int, n: int | None = None):
        """``n`` prompts spread over a split (None: all), in a fixed order: ``(tokens [N, Tq]
        left-padded, mask [N, Tq], texts)``. A split with fewer than ``n`` is an error."""
        source = self.prompt_source(split)
        recs = [source[int(i)] for i in spread(len(source), n)]
        b = batching.prompt_batches(recs, tokenizer, max_len=query_len,
                                    cfg=batching.LoaderConfig(batch_size=1, shuffle=False,
                                                              drop_remainder=False,
                                                              shard_by_process=False),
                                    keep=self.prompt_keep)
        rows = list(b)
        if not rows:
            raise ValueError(f"task {self.name!r}: no usable prompts in split {split!r}")
        if n is not None and len(rows) < n:  # never hand back fewer than asked, silently
            raise ValueError(f"task {self.name!r}: {n} prompts asked from split {split!r}, which "
                             f"has {len(rows)}; ask for at most {len(rows)}")
        return (np.concatenate([r["tokens"] for r in rows]),
                np.concatenate([r["mask"] for r in rows]), [str(r["text"][0]) for r in rows])

    def prompt_batches(self, tokenizer, query_len: int, batch_size: int, seed: int):
        """Endless shuffled batches of training prompts (``tokens``, ``mask`` ``[B, Tq]``)."""
        return batching.prompt_batches(
            self.prompt_source("train"), tokenizer, max_len=query_len,
            cfg=batching.LoaderConfig(batch_size, seed=seed, num_epochs=None),
            keep=self.prompt_keep)
