"""Reddit TL;DR summarisation data of Stiennon et al. 2020, "Learning to summarize from human
feedback" (openai/summarize-from-feedback), downloaded when online.

Two TFDS builders, both fetched through TFDS's download manager (cached under
``data_dir/downloads``):

* :class:`TldrSft` (``rlhf_tldr_sft``): the filtered TL;DR demonstrations, JSONL lines
  ``{"id", "subreddit", "title", "post", "summary"}`` from ``SFT_URLS`` (splits ``train`` 116,722,
  ``valid`` 6,447, ``test`` 6,553 in the paper's release).
* :class:`TldrComparisons` (``rlhf_tldr_comparisons``): the human comparisons, JSONL lines
  ``{"info": {"id", "post", "title", "subreddit"}, "summaries": [{"text", "policy", ...}] * 2,
  "choice": 0|1, "worker": str, "batch": str, "split": "train"|"valid1"|"valid2",
  "extra": {"confidence": int?}}`` from ``COMPARISON_URLS``: the Reddit batches ``batch3``..
  ``batch22`` (no ``batch21`` exists); the CNN/DM batches (``batch0_cnndm``, ``cnndm0``,
  ``cnndm2``), whose ``info`` holds an article instead of a post, are not used. Splits follow the
  record's ``split`` field: ``train``, ``valid1``, ``valid2``.

Comparison examples carry ``prompt`` (:func:`format_prompt`), ``responses`` (the two summaries),
``ranks`` (chosen 0, other 1), ``policies``, ``labeler`` (the worker id), so
:func:`rlhf_jax.data.batching.comparison_batches` consumes them as-is. SFT examples are turned into
``(prompt, " " + summary)`` by :func:`sft_pair`.

Bad records (malformed JSON, non-UTF-8 bytes, missing/wrongly typed fields, ``choice`` not 0/1,
not exactly two summaries, empty summary) are skipped and counted in the builder's report
(``on_error="skip"``, the default for downloaded data) or raise ``DataError`` with file and line.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import tfds_utils
from rlhf_jax.data.errors import DataError

BASE_URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback"
SFT_URLS = {s: f"{BASE_URL}/datasets/tldr_3_filtered/{s}.jsonl" for s in ("train", "valid", "test")}
COMPARISON_BATCHES = tuple(f"batch{i}" for i in range(3, 23) if i != 21)
COMPARISON_URLS = {b: f"{BASE_URL}/dataset/comparisons/{b}.json" for b in COMPARISON_BATCHES}
COMPARISON_SPLITS = ("train", "valid1", "valid2")

PROMPT_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def format_prompt(subreddit: str, title: str, post: str) -> str:
    """The TL;DR query of Stiennon et al.: subreddit, title and post, ending in ``"TL;DR:"``."""
    return PROMPT_FORMAT.format(subreddit=subreddit, title=title, post=post.strip())


def sft_pair(ex: Mapping) -> tuple[str, str]:
    """A decoded ``rlhf_tldr_sft`` example -> ``(prompt, " " + summary)``."""
    return (format_prompt(ex["subreddit"], ex["title"], ex["post"]),
            " " + ex["summary"].strip())


def _str_field(obj: Mapping, field: str, where: str, prefix: str = "") -> str:
    if not isinstance(obj, Mapping) or field not in obj:
        raise DataError(where, "missing_field", "missing (expected str)", prefix + field)
    v = obj[field]
    if not isinstance(v, str):
        raise DataError(where, "wrong_type", f"expected str, got {type(v).__name__}",
                        prefix + field)
    return v


def parse_sft(obj, where: str) -> dict:
    """Validates one SFT line; returns the feature dict."""
    if not isinstance(obj, dict):
        raise DataError(where, "wrong_type", f"expected a JSON object, got {type(obj).__name__}")
    out = {f: _str_field(obj, f, where) for f in ("id", "subreddit", "title", "post", "summary")}
    if not out["summary"].strip():
        raise DataError(where, "empty_response", "expected a non-empty summary", "summary")
    return out


def parse_comparison(obj, where: str) -> dict:
    """Validates one comparison line; returns the feature dict (split in ``"split"``)."""
    if not isinstance(obj, dict):
        raise DataError(where, "wrong_type", f"expected a JSON object, got {type(obj).__name__}")
    info = obj.get("info")
    if not isinstance(info, dict):
        raise DataError(where, "missing_field" if info is None else "wrong_type",
                        "expected an object with id, post, title, subreddit", "info")
    fields = {f: _str_field(info, f, where, "info.") for f in ("id", "post", "title", "subreddit")}
    summaries = obj.get("summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError(where, "rank_mismatch", "expected a list of exactly 2 summaries, got "
                        f"{summaries if not isinstance(summaries, list) else len(summaries)}",
                        "summaries")
    texts = [_str_field(s, "text", where, f"summaries[{i}].") for i, s in enumerate(summaries)]
    policies = [_str_field(s, "policy", where, f"summaries[{i}].")
                for i, s in enumerate(summaries)]
    for i, t in enumerate(texts):
        if not t.strip():
            raise DataError(where, "empty_response", "expected a non-empty summary",
                            f"summaries[{i}].text")
    choice = obj.get("choice")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise DataError(where, "rank_mismatch", f"expected 0 or 1, got {choice!r}", "choice")
    split = _str_field(obj, "split", where)
    if split not in COMPARISON_SPLITS:
        raise DataError(where, "bad_split", f"expected one of {COMPARISON_SPLITS}, got {split!r}",
                        "split")
    worker = _str_field(obj, "worker", where)
    extra = obj.get("extra") if isinstance(obj.get("extra"), dict) else {}
    conf = extra.get("confidence")
    return {"id": fields["id"], "subreddit": fields["subreddit"], "title": fields["title"],
            "post": fields["post"],
            "prompt": format_prompt(fields["subreddit"], fields["title"], fields["post"]),
            "responses": texts, "policies": policies,
            "ranks": np.asarray([0, 1] if choice == 0 else [1, 0], np.int32),
            "labeler": worker, "batch": str(obj.get("batch", "")),
            "confidence": int(conf) if isinstance(conf, int) and not isinstance(conf, bool)
            else -1,
            "split": split}


class TldrSft(tfds_utils.RlhfBuilder):
    """``rlhf_tldr_sft``: filtered TL;DR posts with reference summaries (see module doc)."""
    name = "rlhf_tldr_sft"
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "TL;DR filtered SFT set of Stiennon et al. 2020."

    def __init__(self, *, on_error: str = "skip", **kwargs):
        super().__init__(on_error=on_error, **kwargs)

    def _features(self):
        return tfds.features.FeaturesDict({f: tfds.features.Text() for f in
                                           ("id", "subreddit", "title", "post", "summary")})

    def _split_generators(self, dl_manager):
        paths = dl_manager.download(SFT_URLS)
        return {split: self._generate_examples(paths[split], SFT_URLS[split])
                for split in SFT_URLS}

    def _generate_examples(self, path, url):
        name = url.rsplit("/", 1)[-1]
        for lineno, _, ex in self.parsed_jsonl(path, name, parse_sft):
            yield lineno, ex  # integer keys keep file order (disable_shuffling sorts by key)


class TldrComparisons(tfds_utils.RlhfBuilder):
    """``rlhf_tldr_comparisons``: pairwise human preferences between summaries (module doc)."""
    name = "rlhf_tldr_comparisons"
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "TL;DR human comparisons of Stiennon et al. 2020 (Reddit batches)."

    def __init__(self, *, on_error: str = "skip", **kwargs):
        super().__init__(on_error=on_error, **kwargs)

    def _features(self):
        text = tfds.features.Text
        return tfds.features.FeaturesDict({
            "id": text(), "subreddit": text(), "title": text(), "post": text(), "prompt": text(),
            "responses": tfds.features.Sequence(text()),
            "policies": tfds.features.Sequence(text()),
            "ranks": tfds.features.Sequence(np.int32),
            "labeler": text(), "batch": text(), "confidence": np.int32,
            "source": text(),  # "batchN.json:line"
        })

    def _split_generators(self, dl_manager):
        paths = dl_manager.download(COMPARISON_URLS)
        # Records name their own split, so parse every file once and route by `split`.
        by_split = {s: [] for s in COMPARISON_SPLITS}
        for batch in COMPARISON_BATCHES:
            name = f"{batch}.json"
            for _, where, ex in self.parsed_jsonl(paths[batch], name, parse_comparison):
                ex["source"] = where
                by_split[ex.pop("split")].append(ex)
        # TFDS cannot write an empty split (only possible with partial or test files).
        return {s: self._generate_examples(by_split[s]) for s in COMPARISON_SPLITS
                if by_split[s]}

    def _generate_examples(self, rows):
        yield from enumerate(rows)
