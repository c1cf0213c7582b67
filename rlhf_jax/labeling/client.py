"""A Python client of the labeling API, and the simulated labeler that uses it.

:class:`LabelingClient` speaks the same HTTP API as the page (``/api/next``, ``/api/submit``,
``/api/skip``, ``/api/undo``). It retries a request that got no answer (connection refused or
reset, timeout, 5xx) with backoff until ``retry_seconds`` have passed — reusing the same
``submission_id``, so a ranking the server stored before its answer was lost is not stored twice.

:func:`simulate` is a labeler without a person: for each item it is shown, it looks up the gold
scores of the responses (:class:`GoldLookup`: from the records' ``gold_scores``, or by scoring the
texts with a saved :class:`~rlhf_jax.labelers.GoldSentimentScorer`) and ranks them with
:func:`~rlhf_jax.labelers.simulated_ranks` (Bradley–Terry noise of temperature τ). Responses
arrive shuffled and without policy names, exactly as the page shows them, so gold scores are
matched to responses by their text.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence
import uuid

import httpx
import numpy as np

from rlhf_jax.labelers import GoldSentimentScorer, simulated_ranks


class LabelingHTTPError(RuntimeError):
    """The server answered with an error status; ``detail`` is its explanation."""

    def __init__(self, status: int, detail: str, path: str):
        super().__init__(f"{path}: HTTP {status}: {detail}")
        self.status, self.detail, self.path = status, detail, path


def new_submission_id() -> str:
    """A fresh id for one ranking (reuse it when retrying that ranking)."""
    return uuid.uuid4().hex


class LabelingClient:
    """One labeler's session with a labeling server.

    Args:
      url: the server, e.g. ``http://127.0.0.1:8765``.
      labeler: the labeler's name (servers without tokens).
      token: the labeler's token (servers started with ``--tokens-file``).
      timeout: seconds for one HTTP request.
      retry_seconds: keep retrying a request without an answer this long, then raise.
    """

    def __init__(self, url: str, *, labeler: str | None = None, token: str | None = None,
                 timeout: float = 10.0, retry_seconds: float = 60.0):
        if (labeler is None) == (token is None):
            raise ValueError("give exactly one of labeler= (open server) or token=")
        headers = {"X-Labeler": labeler} if labeler is not None else \
            {"Authorization": f"Bearer {token}"}
        self.url = url.rstrip("/")
        self.retry_seconds = retry_seconds
        self.retries = 0  # requests sent again after getting no answer
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LabelingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict | None = None,
              on_retry_status: Callable[[int], Any] | None = None) -> Any:
        deadline = time.monotonic() + self.retry_seconds
        delay, attempt = 0.05, 0
        while True:
            attempt += 1
            try:
                r = self._http.request(method, path, json=body)
            except httpx.TransportError as e:
                err: Exception = e
            else:
                if r.status_code < 500:
                    if r.is_success:
                        return r.json()
                    if attempt > 1 and on_retry_status is not None:
                        handled = on_retry_status(r.status_code)
                        if handled is not None:
                            return handled
                    try:
                        detail = r.json().get("detail", r.text)
                    except ValueError:
                        detail = r.text
                    raise LabelingHTTPError(r.status_code, str(detail), path)
                err = LabelingHTTPError(r.status_code, r.text[:200], path)
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"{method} {self.url}{path}: no answer for "
                                   f"{self.retry_seconds:.0f} s (last error: {err!r})") from err
            self.retries += 1
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def config(self) -> dict:
        return self._call("GET", "/api/config")

    def next(self) -> dict:
        """``{"item", "progress", "last"}``: the current item (leased to this labeler) or None."""
        return self._call("GET", "/api/next")

    def submit(self, item: int, ranks: Sequence[int], submission_id: str | None = None) -> dict:
        """Submits display-order ``ranks`` for ``item``; ``{"result", "state"}``."""
        body = {"item": int(item), "ranks": [int(r) for r in ranks],
                "submission_id": submission_id or new_submission_id()}
        return self._call("POST", "/api/submit", body)

    def skip(self, item: int) -> dict:
        return self._call("POST", "/api/skip", {"item": int(item)})

    def undo(self, submission_id: str) -> dict:
        """Takes back the ranking ``submission_id`` (must be this labeler's most recent)."""
        def done_before(status: int) -> dict | None:  # a retried undo that had gone through
            return {"result": None, "state": self.next()} if status == 404 else None
        return self._call("POST", "/api/undo", {"submission_id": submission_id}, done_before)

    def agreement(self) -> dict:
        return self._call("GET", "/api/agreement")


class GoldLookup:
    """Gold scores of the responses an item shows, matched by (split, id) and response text."""

    def __init__(self, by_item: Mapping[tuple[str, str], Mapping[str, float]] | None = None,
                 scorer: GoldSentimentScorer | None = None):
        self.by_item = {k: dict(v) for k, v in (by_item or {}).items()}
        self.scorer = scorer

    @classmethod
    def from_records(cls, splits: Mapping[str, Sequence[Mapping]]) -> "GoldLookup":
        """From comparison records (``{split: records}``) that carry ``gold_scores``."""
        by_item = {}
        for split, recs in splits.items():
            for r in recs:
                if r.get("gold_scores") is not None:
                    by_item[(split, r["id"])] = {t: float(g) for t, g in
                                                 zip(r["responses"], r["gold_scores"])}
        return cls(by_item)

    @classmethod
    def from_source(cls, source: str | os.PathLike) -> "GoldLookup":
        """From JSONL files (same layout as ``serve``'s source) whose records carry gold."""
        from rlhf_jax.data import comparisons
        from rlhf_jax.labeling.records import find_sources

        return cls.from_records({split: [r for p in paths for r in comparisons.read_comparisons(
            p, require_ranks=False)] for split, paths in find_sources(source).items()})

    @classmethod
    def from_scorer(cls, path: str | os.PathLike) -> "GoldLookup":
        """Scores the texts with a saved :class:`GoldSentimentScorer` (the collect stage's)."""
        return cls(scorer=GoldSentimentScorer.load(path))

    def scores(self, view: Mapping) -> np.ndarray | None:
        """Gold scores of ``view["responses"]`` in display order, or None if unknown."""
        if self.scorer is not None:
            return np.asarray(self.scorer.score(view["responses"]), np.float64)
        table = self.by_item.get((view["split"], view["id"]))
        if table is None or any(t not in table for t in view["responses"]):
            return None
        return np.asarray([table[t] for t in view["responses"]], np.float64)


@dataclasses.dataclass
class SimulationResult:
    """What one simulated labeler did; ``latencies`` are seconds per acknowledged submit."""
    labeler: str
    ranked: int = 0
    skipped: int = 0
    duplicates: int = 0
    retries: int = 0
    latencies: list = dataclasses.field(default_factory=list)
    submissions: list = dataclasses.field(default_factory=list)  # (submission_id, item, ranks)


def simulate(client: LabelingClient, gold: GoldLookup, *, labeler: str, temperature: float = 0.5,
             seed: int = 0, max_items: int | None = None,
             on_submit: Callable[[dict], None] | None = None) -> SimulationResult:
    """Ranks items until none is left (or ``max_items``) with a Bradley–Terry-noisy labeler.

    Items whose gold scores are unknown are skipped. Every submission is acknowledged by the
    server before the next item is taken (the client retries lost answers with the same id).
    """
    rng = np.random.default_rng(seed)
    out = SimulationResult(labeler=labeler)
    state = client.next()
    while state["item"] is not None and (max_items is None or out.ranked < max_items):
        view = state["item"]
        g = gold.scores(view)
        if g is None:
            state = client.skip(view["item"])["state"]
            out.skipped += 1
            continue
        ranks = [int(r) for r in simulated_ranks(g[None], temperature, rng)[0]]
        sid = new_submission_id()
        t0 = time.perf_counter()
        answer = client.submit(view["item"], ranks, sid)
        out.latencies.append(time.perf_counter() - t0)
        out.submissions.append((sid, view["item"], ranks))
        out.ranked += 1
        out.duplicates += bool(answer["result"]["duplicate"])
        if on_submit is not None:
            on_submit(answer)
        state = answer["state"]
    out.retries = client.retries
    return out
