"""Your own prompts and demonstrations from JSONL files, with no gold scorer.

``PATH/train.jsonl`` and ``PATH/eval.jsonl``, one JSON object per line::

    {"prompt": "Write a haiku about rain.", "response": "Soft rain on the roof ..."}

``response`` is optional: lines with one are SFT demonstrations (the model learns
``prompt + response``), every line's ``prompt`` is a rollout (train) or evaluation (eval) prompt.
Without a gold scorer, comparisons come from people (``collect --labeler export`` or the labeling
app) and the PPO stage reports reward-model scores and KL only.
"""
from __future__ import annotations

from pathlib import Path

from rlhf_jax.data.errors import DataError, iter_jsonl
from rlhf_jax.tasks.base import spread, Task


class JsonlTask(Task):
    """Prompts (and optional responses) from ``path/{train,eval}.jsonl``."""
    name = "jsonl"
    prompt_keep = "last"

    def __init__(self, path: str):
        self.path = Path(path)
        self._records: dict[str, list[dict]] = {}

    def records(self, split: str) -> list[dict]:
        """The validated records of ``split`` (a :class:`DataError` names file, line and field)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
        if split not in self._records:
            path = self.path / f"{split}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"task jsonl:{self.path}: {path} does not exist (expected "
                                        "train.jsonl and eval.jsonl with one "
                                        '{"prompt": ..., "response": ...} object per line)')
            recs = []
            for lineno, obj in iter_jsonl(path):
                where = f"{path}:{lineno}"
                if not isinstance(obj, dict):
                    raise DataError(where, "wrong_type", "expected a JSON object")
                for field, required in (("prompt", True), ("response", False)):
                    v = obj.get(field)
                    if v is None and not required:
                        continue
                    if not isinstance(v, str) or not v.strip():
                        raise DataError(where, "missing_field" if v is None else "wrong_type",
                                        f"expected a non-empty string, got {v!r}", field)
                recs.append({"prompt": obj["prompt"], "response": obj.get("response")})
            if not recs:
                raise DataError(str(path), "empty", "expected at least one record")
            self._records[split] = recs
        return self._records[split]

    def sft_source(self, split: str, limit: int | None = None):
        demos = [r for r in self.records(split) if r["response"] is not None]
        if not demos:
            raise ValueError(f"task jsonl:{self.path}: no record of {split}.jsonl has a "
                             "'response', so there is nothing to fine-tune on")
        return [{"text": demos[int(i)]["prompt"] + demos[int(i)]["response"]}
                for i in spread(len(demos), limit)]

    def prompt_source(self, split: str):
        return [{"text": r["prompt"]} for r in self.records(split)]
