"""Tokenisation and grain batching for the three kinds of RLHF data.

Every loader returns a :class:`Batches`: iterating it yields fixed-shape NumPy batches (a dict of
arrays, leading axis B) that :func:`rlhf_jax.parallel.shard_batch` can place; keys holding text
(``"text"``) are for logging and are dropped by :func:`arrays_only`.

* :func:`sft_batches`: ``tokens [B,T] int32``, ``mask [B,T] bool`` (real tokens),
  ``loss_mask [B,T] bool`` (response tokens + EOS); right-padded.
* :func:`lm_batches`: packed rows ``tokens``, ``mask``, ``loss_mask`` (= mask),
  ``segment_ids [B,T] int32`` (1, 2, ... per document within the row, 0 = padding).
* :func:`comparison_batches`: ``tokens [B,K,T]``, ``mask [B,K,T]``, ``response_mask [B,K,T]``,
  ``ranks [B,K] int32`` (0 = best; -1 in padded slots), ``valid [B,K] bool``; with
  ``pairs=True`` K = 2 and the chosen response comes first (``ranks = [0, 1]``).
* :func:`prompt_batches`: ``tokens [B,T]`` left-padded, ``mask [B,T]``, ``index [B] int64``
  (example index in the source), ``text [B]`` (object array of the original texts).

(T = ``max_len``, K = ``num_responses``.)

Conventions. Prompt and response are tokenised separately and concatenated (the policy generates
response tokens after the prompt's tokens, so training and sampling see the same split); EOS is
appended to complete responses. ``loss_mask[:, t]`` marks tokens that are *targets*, aligned with
``tokens`` (``lm_loss`` shifts). Padding uses ``tokenizer.pad_id``.

Packing (:func:`lm_batches`): documents are shuffled, each gets EOS appended, and they are
concatenated and cut into rows of T tokens (grain's ``ConcatThenSplitIterDataset``; a document may
continue in the next row). Attention **crosses document boundaries** inside a row, as in GPT-2
pretraining: our Transformer has only causal + padding masks; ``segment_ids`` is provided for a
model that wants to block it.

Overlong examples (``overlong=``): ``"skip"`` (default; counted in ``report`` as ``too_long``),
``"truncate"`` (SFT/comparisons: keep the *last* prompt tokens and the *first* response tokens;
a cut response gets no EOS; counted as ``truncated``), or ``"raise"``. Prompts are always
truncated by ``keep="first"`` (first T tokens: the sentiment task's query is a review's opening)
or ``keep="last"`` (chat prompts, whose end matters), counted as ``truncated``. Empty texts (a
document, a prompt, a demonstration's response) are skipped and counted (``empty``); a blank
response in a comparison is kept, as prompt + EOS (it is what a policy wrote). Counts are per
example index, so a second epoch does not double-count; print ``batches.report.summary()``.

Order and sharding: every process reads the same examples by default: in a multi-process run
each process holds the same *global* batch and :func:`rlhf_jax.parallel.shard_batch` keeps the
rows of its own devices, so a run computes the same numbers on any number of processes. With
``shard_by_process=True`` examples are instead sharded by ``jax.process_index()`` /
``jax.process_count()`` (grain ``ShardByJaxProcess``; each process gets ``n // count`` examples,
per-process batches). Then they are shuffled by ``seed`` (grain's index shuffle, re-drawn every
epoch), then repeated ``num_epochs`` times (``None`` = forever). Everything runs in-process
(no worker processes).

Resuming: ``state = iterator_state(it)`` is a JSON-able dict; ``restore_iterator(fresh_it,
state)`` continues at the same example (store it in a checkpoint's JSON metadata).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from rlhf_jax.data import tfds_utils
from rlhf_jax.data.errors import DataError, DataReport


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How examples are ordered and grouped."""
    batch_size: int
    """B, examples per batch (the global batch; per process with ``shard_by_process``)."""
    seed: int = 0
    """Shuffle seed; the same seed gives the same order on every run."""
    shuffle: bool = True
    """Shuffle examples (per epoch) before batching."""
    num_epochs: int | None = 1
    """Passes over the data; None repeats forever."""
    drop_remainder: bool = True
    """Drop a final partial batch so every batch has exactly B rows."""
    shard_by_process: bool = False
    """Give each JAX process a disjoint shard of the examples (default: every process reads the
    same global batches)."""
    read_threads: int = 1
    """Threads that prefetch elements in-process (0 = none). Prefetched examples are counted in
    the report before they are consumed; iterator state still points at the next unconsumed one."""
    prefetch: int = 16
    """Elements prefetched per thread."""


class Batches:
    """An iterable of fixed-shape batches with the report of what was skipped or changed.

    Attributes:
      dataset: the grain ``IterDataset``; ``iter(batches)`` returns a fresh iterator from the start.
      report: :class:`DataReport` filled as examples are read (skips are counted once per index).
      num_examples: examples in this process's shard for one epoch (before skips).
    """

    def __init__(self, dataset: grain.IterDataset, report: DataReport, num_examples: int):
        self.dataset, self.report, self.num_examples = dataset, report, num_examples

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def iterator_state(it: grain.DatasetIterator) -> dict:
    """The iterator's position as a JSON-able dict (for a checkpoint's JSON metadata)."""
    return json.loads(json.dumps(it.get_state()))


def restore_iterator(it: grain.DatasetIterator, state: Mapping) -> grain.DatasetIterator:
    """Moves a fresh iterator of the same pipeline to ``state``; returns it."""
    it.set_state(_tuples(state))
    return it


def _tuples(x):
    # JSON turns grain's (start, stop) tuples into lists; grain compares/unpacks them as tuples.
    if isinstance(x, Mapping):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def arrays_only(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The numeric arrays of a batch (drops text), ready for ``shard_batch``."""
    return {k: v for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


# ----------------------------------------------------------------------------------------------
# Tokenisation of single examples (pure functions; the loaders map them over a source).

def _text(ex: Mapping, key: str, where: str) -> str:
    if key not in ex:
        raise DataError(where, "missing_field", f"missing (expected text); fields are "
                        f"{sorted(ex)}", key)
    v = ex[key]
    if isinstance(v, (bytes, np.bytes_)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(where, "not_utf8", f"bytes are not valid UTF-8 at byte {e.start}",
                            key) from None
    if not isinstance(v, str):
        raise DataError(where, "wrong_type", f"expected str, got {type(v).__name__}", key)
    return v


def _fit(p: list[int], r: list[int], eos: int, t: int, overlong: str, where: str,
         report: DataReport, key) -> tuple[list[int], list[int]] | None:
    """prompt + response + EOS in at most t tokens under the ``overlong`` rule (module doc)."""
    n = len(p) + len(r) + 1
    if n <= t:
        return p, r + [eos]
    msg = f"{where}: {n} tokens (prompt {len(p)} + response {len(r)} + EOS) > max_len {t}"
    if overlong == "raise":
        raise DataError(where, "too_long", f"{n} tokens (prompt {len(p)} + response {len(r)} + "
                        f"EOS), expected at most max_len={t}")
    if overlong == "skip":
        report.skip("too_long", msg, key=key)
        return None
    report.modify("truncated", msg, key=key)
    if len(r) + 1 <= t - min(len(p), 1):
        return p[len(p) - (t - len(r) - 1):], r + [eos]
    r = r[:t - min(len(p), 1)]
    return p[len(p) - (t - len(r)):] if t > len(r) else [], r


def encode_prompt_response(tokenizer, prompt: str, response: str, max_len: int, *,
                           overlong: str = "skip", report: DataReport | None = None,
                           where: str = "<example>", key=None,
                           allow_empty: bool = False) -> dict[str, np.ndarray] | None:
    """``[prompt | response | EOS | pad...]`` as ``tokens``, ``mask``, ``loss_mask`` ``[T]``.

    ``loss_mask`` is True on the response tokens and EOS. Returns None when the example is
    skipped (empty response, or too long with ``overlong="skip"``; counted in ``report``).
    ``allow_empty``: a blank response is encoded as it is (only EOS when it is ``""``) instead:
    a demonstration must say something, a sampled response in a comparison is what it is.
    """
    report = report if report is not None else DataReport()
    if not allow_empty and not response.strip():
        if overlong == "raise":
            raise DataError(where, "empty", "expected a non-empty response", "response")
        report.skip("empty", f"{where}: empty response", key=key)
        return None
    p = tokenizer.encode(prompt) if prompt else []
    r = tokenizer.encode(response)
    fit = _fit(p, r, tokenizer.eos_id, max_len, overlong, where, report, key)
    if fit is None:
        return None
    p, r = fit
    n = len(p) + len(r)
    tokens = np.full((max_len,), tokenizer.pad_id, np.int32)
    tokens[:n] = p + r
    mask = np.arange(max_len) < n
    loss_mask = mask & (np.arange(max_len) >= len(p))
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def encode_prompt(tokenizer, text: str, max_len: int, *, keep: str = "first",
                  report: DataReport | None = None, where: str = "<example>",
                  key=None) -> dict[str, np.ndarray] | None:
    """A left-padded prompt: ``tokens [T]``, ``mask [T]``; None (counted) for an empty text.

    Longer prompts are truncated to ``max_len`` tokens keeping the ``"first"`` or ``"last"``
    ones (counted as ``truncated``).
    """
    if keep not in ("first", "last"):
        raise ValueError(f"keep must be 'first' or 'last', got {keep!r}")
    report = report if report is not None else DataReport()
    ids = tokenizer.encode(text) if text.strip() else []
    if not ids:
        report.skip("empty", f"{where}: empty prompt", key=key)
        return None
    if len(ids) > max_len:
        report.modify("truncated", f"{where}: {len(ids)} tokens -> kept the {keep} {max_len}",
                      key=key)
        ids = ids[:max_len] if keep == "first" else ids[len(ids) - max_len:]
    tokens = np.full((max_len,), tokenizer.pad_id, np.int32)
    tokens[max_len - len(ids):] = ids
    return {"tokens": tokens, "mask": np.arange(max_len) >= max_len - len(ids)}


def decode_rows(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Texts of the masked tokens of each row of ``tokens [..., T]`` (for logs and tests)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    flat_t = tokens.reshape(-1, tokens.shape[-1])
    flat_m = mask.reshape(-1, mask.shape[-1])
    return [tokenizer.decode(t[m].tolist()) for t, m in zip(flat_t, flat_m)]


# ----------------------------------------------------------------------------------------------
# Pipelines.

def _pipeline(n: int, fn: Callable[[int], dict | None], cfg: LoaderConfig, name: str,
              report: DataReport) -> tuple[grain.IterDataset, int]:
    """index source -> shard -> shuffle -> repeat -> map(fn) -> drop Nones -> IterDataset.

    Every index whose ``fn`` returns an example is counted once in ``report.kept``."""
    ds = grain.MapDataset.range(n)
    if cfg.shard_by_process:
        shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        per = n // shard.shard_count
        ds = ds[shard.shard_index:per * shard.shard_count:shard.shard_count]
    num = len(ds)
    if num == 0:
        raise ValueError(f"{name}: no examples in this process's shard (source has {n})")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)

    def counted(i):
        out = fn(i)
        if out is not None:
            report.keep(key=int(i))
        return out

    ds = ds.map(counted)  # None = skipped (and counted by fn); to_iter_dataset drops Nones
    opts = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    return ds.to_iter_dataset(opts), num


def _stack(xs: Sequence[dict]) -> dict:
    out = {}
    for k in xs[0]:
        vals = [x[k] for x in xs]
        out[k] = np.array(vals, dtype=object) if isinstance(vals[0], str) else np.stack(vals)
    return out


def _batch(ds: grain.IterDataset, cfg: LoaderConfig) -> grain.IterDataset:
    return ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder, batch_fn=_stack)


def sft_batches(source: Sequence[Mapping], tokenizer, *, max_len: int, cfg: LoaderConfig,
                prompt_key: str = "prompt", response_key: str = "response",
                to_pair: Callable[[dict], tuple[str, str]] | None = None,
                overlong: str = "skip", name: str = "sft") -> Batches:
    """Demonstrations -> ``tokens``/``mask``/``loss_mask`` ``[B, T]`` (loss on response + EOS).

    Args:
      source: random-access examples (a TFDS data source, a list of dicts).
      tokenizer: has ``encode``, ``eos_id``, ``pad_id``.
      max_len: T.
      cfg: order/batching.
      prompt_key, response_key: text fields, unless ``to_pair(decoded_example) -> (prompt,
        response)`` is given (e.g. :func:`rlhf_jax.data.tldr.sft_pair`).
      overlong: ``"skip"`` | ``"truncate"`` | ``"raise"`` (module docstring).
    """
    report = DataReport(name=name)

    def fn(i):
        where = f"{name}#{i}"
        ex = source[i]
        if to_pair is not None:
            prompt, response = to_pair(tfds_utils.decode(ex))
        else:
            prompt, response = _text(ex, prompt_key, where), _text(ex, response_key, where)
        return encode_prompt_response(tokenizer, prompt, response, max_len, overlong=overlong,
                                      report=report, where=where, key=i)

    ds, n = _pipeline(len(source), fn, cfg, name, report)
    return Batches(_batch(ds, cfg), report, n)


def lm_batches(source: Sequence[Mapping], tokenizer, *, max_len: int, cfg: LoaderConfig,
               text_key: str = "text", name: str = "lm") -> Batches:
    """Plain text, packed: documents + EOS concatenated and cut into rows of ``max_len`` tokens.

    ``mask``/``loss_mask`` are True on every real token (False only in the zero-padded tail of
    the very last row of a finite pass); ``segment_ids`` numbers the documents within a row.
    """
    report = DataReport(name=name)

    def fn(i):
        where = f"{name}#{i}"
        text = _text(source[i], text_key, where)
        ids = tokenizer.encode(text) if text.strip() else []
        if not ids:
            report.skip("empty", f"{where}: empty text", key=i)
            return None
        ids.append(tokenizer.eos_id)
        return {"tokens": np.asarray(ids, np.int32), "mask": np.ones(len(ids), bool)}

    ds, n = _pipeline(len(source), fn, cfg, name, report)
    packed = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"tokens": max_len, "mask": max_len})

    def finish(x):
        pad = ~x["mask"]
        tokens = np.where(pad, tokenizer.pad_id, x["tokens"]).astype(np.int32)
        return {"tokens": tokens, "mask": x["mask"], "loss_mask": x["mask"].copy(),
                "segment_ids": x["tokens_segment_ids"].astype(np.int32)}

    return Batches(_batch(packed.map(finish), cfg), report, n)


def comparison_batches(source: Sequence[Mapping], tokenizer, *, max_len: int, cfg: LoaderConfig,
                       num_responses: int | None = None, pairs: bool = False,
                       overlong: str = "skip", name: str = "comparisons") -> Batches:
    """Rankings -> ``tokens [B,K,T]`` etc. (module table); ``pairs=True`` -> ``[B,2,T]``.

    Args:
      source: examples with ``prompt``, ``responses`` (K texts) and ``ranks`` (K ints, 0 = best):
        the ``rlhf_comparisons`` TFDS source, or TL;DR/HH comparisons, or decoded records.
      num_responses: K of the batch; examples with fewer responses are padded (``valid`` False,
        rank -1, no tokens), more are skipped (``too_many_responses``). Default: K of example 0.
      pairs: emit one row per ordered pair a ranking implies (winner first; ties give no pair).
        Pairs are enumerated once up front from the ranks; a ranking with no untied pair is
        counted as ``no_pairs``.
      overlong: ``"skip"`` (whole example/pair), ``"truncate"`` or ``"raise"``; see module doc.
    """
    report = DataReport(name=name)

    def record(i):
        where = f"{name}#{i}"
        ex = source[i]
        prompt = _text(ex, "prompt", where)
        if "responses" not in ex or "ranks" not in ex:
            raise DataError(where, "missing_field", "expected responses and ranks",
                            "responses" if "responses" not in ex else "ranks")
        responses = [_text({"r": r}, "r", where) for r in ex["responses"]]
        ranks = [int(r) for r in np.asarray(ex["ranks"]).reshape(-1)]
        if len(ranks) != len(responses):
            raise DataError(where, "rank_mismatch", f"expected K={len(responses)} ranks, got "
                            f"{len(ranks)}", "ranks")
        return prompt, responses, ranks

    def encode_k(prompt, responses, where, key):
        rows = []
        for j, resp in enumerate(responses):
            row = encode_prompt_response(tokenizer, prompt, resp, max_len, overlong=overlong,
                                         report=report, where=f"{where} response {j}", key=key,
                                         allow_empty=True)
            if row is None:
                return None
            rows.append(row)
        return rows

    if pairs:
        index = []
        for i in range(len(source)):
            _, _, ranks = record(i)
            found = [(i, a, b) for a in range(len(ranks)) for b in range(len(ranks))
                     if ranks[a] < ranks[b]]
            if not found:
                report.skip("no_pairs", f"{name}#{i}: ranks {ranks} are all tied", key=i)
            index.extend(found)

        def fn(j):
            i, a, b = index[j]
            prompt, responses, _ = record(i)
            rows = encode_k(prompt, [responses[a], responses[b]], f"{name}#{i}", key=j)
            if rows is None:
                return None
            out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            out["response_mask"] = out.pop("loss_mask")
            out["ranks"] = np.array([0, 1], np.int32)
            out["valid"] = np.ones(2, bool)
            return out

        if not index:
            raise ValueError(f"{name}: no untied pairs in {len(source)} rankings")
        ds, n = _pipeline(len(index), fn, cfg, name, report)
        return Batches(_batch(ds, cfg), report, n)

    k_max = num_responses or len(record(0)[1])

    def fn(i):
        where = f"{name}#{i}"
        prompt, responses, ranks = record(i)
        if len(responses) > k_max:
            report.skip("too_many_responses", f"{where}: {len(responses)} responses > "
                        f"num_responses={k_max}", key=i)
            return None
        rows = encode_k(prompt, responses, where, key=i)
        if rows is None:
            return None
        k = len(rows)
        out = {key: np.zeros((k_max, max_len), rows[0][key].dtype) for key in rows[0]}
        out["tokens"][:] = tokenizer.pad_id
        for j, r in enumerate(rows):
            for key in r:
                out[key][j] = r[key]
        out["response_mask"] = out.pop("loss_mask")
        out["ranks"] = np.full((k_max,), -1, np.int32)
        out["ranks"][:k] = ranks
        out["valid"] = np.arange(k_max) < k
        return out

    ds, n = _pipeline(len(source), fn, cfg, name, report)
    return Batches(_batch(ds, cfg), report, n)


def prompt_batches(source: Sequence[Mapping], tokenizer, *, max_len: int, cfg: LoaderConfig,
                   text_key: str = "text", keep: str = "first",
                   to_prompt: Callable[[dict], str] | None = None,
                   name: str = "prompts") -> Batches:
    """Prompts for PPO rollouts: left-padded ``tokens``/``mask`` ``[B, T]`` + original ``text``.

    ``keep="first"`` keeps the first ``max_len`` tokens (IMDB: the review's opening is the query),
    ``"last"`` the last ones (chat prompts). ``to_prompt(decoded_example) -> str`` formats
    structured examples (e.g. TL;DR posts, HH dialogues).
    """
    report = DataReport(name=name)

    def fn(i):
        where = f"{name}#{i}"
        ex = source[i]
        text = to_prompt(tfds_utils.decode(ex)) if to_prompt else _text(ex, text_key, where)
        out = encode_prompt(tokenizer, text, max_len, keep=keep, report=report, where=where,
                            key=i)
        if out is None:
            return None
        out["index"] = np.int64(i)
        out["text"] = text
        return out

    ds, n = _pipeline(len(source), fn, cfg, name, report)
    return Batches(_batch(ds, cfg), report, n)


def iterate(batches: Batches, state: Mapping | None = None) -> Iterator[dict]:
    """A fresh iterator over ``batches``, restored to ``state`` when given."""
    it = iter(batches)
    return restore_iterator(it, state) if state is not None else it
