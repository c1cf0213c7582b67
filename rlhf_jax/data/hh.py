"""Anthropic HH-RLHF (Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF"),
downloaded when online.

Each line of ``<subset>/{train,test}.jsonl.gz`` is ``{"chosen": str, "rejected": str}``, two
whole dialogues ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` that share everything up to the final
assistant turn. :func:`split_prompt` cuts them into the shared prompt and the two final replies:
the prompt is the longest common prefix of both transcripts, cut after its **last**
``"\\n\\nAssistant:"``; the replies are what follows (they keep their leading space).

TFDS builder :class:`HhRlhf` (``rlhf_hh``), one config per subset (``harmless_base``,
``helpful_base``, ``helpful_online``, ``helpful_rejection_sampled``) and ``all`` (their union;
ids are ``<subset>/<split>/<line>``). The ``red-team-attempts`` subset has another format and is
not included. Features: ``id``, ``prompt``, ``chosen``, ``rejected``, and for
:func:`rlhf_jax.data.batching.comparison_batches`: ``responses = [chosen, rejected]``,
``ranks = [0, 1]``.

Files are fetched with TFDS's download manager (``dl_manager.download``, cached under
``data_dir/downloads``) and decompressed by Python's ``gzip`` while reading: TFDS's own extractor
needs TensorFlow.

Bad records (malformed JSON, non-UTF-8, missing/wrongly typed fields, no shared
``"\\n\\nAssistant:"`` prefix, an empty reply, identical replies) are skipped and counted in the
builder's report (``on_error="skip"``, default) or raise ``DataError`` naming file and line.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import tfds_utils
from rlhf_jax.data.errors import DataError

BASE_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "test")
ASSISTANT = "\n\nAssistant:"


def urls(subset: str) -> dict[str, str]:
    return {s: f"{BASE_URL}/{subset}/{s}.jsonl.gz" for s in SPLITS}


def split_prompt(chosen: str, rejected: str, where: str = "<example>") -> tuple[str, str, str]:
    """``(prompt, chosen_reply, rejected_reply)`` from two transcripts (rule in module doc)."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)
    if cut < 0 or cut + len(ASSISTANT) > n:
        raise DataError(where, "no_shared_prompt", "expected both transcripts to share a prefix "
                        f"ending in {ASSISTANT!r}", "chosen")
    end = cut + len(ASSISTANT)
    prompt, a, b = chosen[:end], chosen[end:], rejected[end:]
    for field, reply in (("chosen", a), ("rejected", b)):
        if not reply.strip():
            raise DataError(where, "empty_response", "expected a non-empty final assistant "
                            "reply", field)
    if a == b:
        raise DataError(where, "identical", "chosen and rejected replies are identical",
                        "rejected")
    return prompt, a, b


def parse_line(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(where, "wrong_type", f"expected a JSON object, got {type(obj).__name__}")
    for f in ("chosen", "rejected"):
        if f not in obj:
            raise DataError(where, "missing_field", "missing (expected str)", f)
        if not isinstance(obj[f], str):
            raise DataError(where, "wrong_type", f"expected str, got {type(obj[f]).__name__}", f)
    prompt, a, b = split_prompt(obj["chosen"], obj["rejected"], where)
    return {"prompt": prompt, "chosen": a, "rejected": b, "responses": [a, b],
            "ranks": np.asarray([0, 1], np.int32)}


class HhRlhf(tfds_utils.RlhfBuilder):
    """``rlhf_hh``: Anthropic HH-RLHF preference pairs (see module doc)."""
    name = "rlhf_hh"
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "Anthropic HH-RLHF chosen/rejected dialogues, split into prompt and replies."
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s.replace("-", "_"),
                                               description=f"HH-RLHF subset {s}")
                       for s in SUBSETS] + [
                           tfds.core.BuilderConfig(name="all", description="all four subsets")]
    DEFAULT_CONFIG_NAME = "helpful_base"

    def __init__(self, *, on_error: str = "skip", **kwargs):
        super().__init__(on_error=on_error, **kwargs)

    def _features(self):
        text = tfds.features.Text
        return tfds.features.FeaturesDict({
            "id": text(), "prompt": text(), "chosen": text(), "rejected": text(),
            "responses": tfds.features.Sequence(text()),
            "ranks": tfds.features.Sequence(np.int32),
        })

    def _subsets(self) -> tuple[str, ...]:
        name = self.builder_config.name
        return SUBSETS if name == "all" else (name.replace("_", "-"),)

    def _split_generators(self, dl_manager):
        subsets = self._subsets()
        paths = dl_manager.download(
            {f"{sub}/{s}": u for sub in subsets for s, u in urls(sub).items()})
        return {s: self._generate_examples([(f"{sub}/{s}", paths[f"{sub}/{s}"])
                                            for sub in subsets]) for s in SPLITS}

    def _generate_examples(self, files):
        n = 0  # integer keys keep file order (disable_shuffling sorts by key)
        for name, path in files:
            for lineno, _, ex in self.parsed_jsonl(path, f"{name}.jsonl", parse_line):
                ex["id"] = f"{name}/{lineno}"
                yield n, ex
                n += 1


def default_dir(data_dir: str | None) -> str:
    return os.path.expanduser(data_dir or tfds_utils.default_data_dir())
