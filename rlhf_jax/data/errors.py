"""Errors and skip reports for data on disk.

Every bad record either raises a :class:`DataError` that names where it came from (file, line or
record, field) and what was expected, or is skipped by a documented rule and counted in a
:class:`DataReport`. Nothing is dropped silently: a pipeline that skips prints ``report.summary()``.
"""
from __future__ import annotations

import base64
import codecs
import collections
import dataclasses
import gzip
import json
from typing import Any

import numpy as np


class DataError(ValueError):
    """A record that does not match its schema.

    Attributes:
      where: ``"path:line"`` or ``"path#record"`` (``"<records>#i"`` for in-memory data).
      field: the offending field (dotted path such as ``"ranks[2]"``), or ``None``.
      reason: a short machine-readable key, e.g. ``"bad_json"``, ``"missing_field"``.
    """

    def __init__(self, where: str, reason: str, message: str, field: str | None = None):
        self.where, self.reason, self.field = where, reason, field
        field_txt = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{field_txt} {message} [{reason}]")


@dataclasses.dataclass
class DataReport:
    """Counts of examples kept, skipped (by reason) and modified (e.g. truncated).

    A report deduplicates by ``key`` so that a lazily evaluated pipeline which visits an example
    once per epoch counts it once. ``examples`` keeps the first ``max_examples`` messages of
    each reason for the printed summary.
    """
    name: str = "data"
    max_examples: int = 3
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    modified: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)
    _seen: set = dataclasses.field(default_factory=set, repr=False)

    def _note(self, kind: str, reason: str, message: str, key: Any) -> bool:
        if key is not None:
            if (kind, reason, key) in self._seen:
                return False
            self._seen.add((kind, reason, key))
        bucket = self.examples.setdefault(f"{kind}:{reason}", [])
        if len(bucket) < self.max_examples:
            bucket.append(message)
        return True

    def skip(self, reason: str, message: str, key: Any = None) -> None:
        """Record one skipped example (``reason`` is a short key such as ``"too_long"``)."""
        if self._note("skipped", reason, message, key):
            self.skipped[reason] += 1

    def skip_error(self, err: DataError, key: Any = None) -> None:
        self.skip(err.reason, str(err), key=key)

    def modify(self, reason: str, message: str, key: Any = None) -> None:
        """Record one example that was kept but changed (e.g. ``"truncated"``)."""
        if self._note("modified", reason, message, key):
            self.modified[reason] += 1

    def keep(self, n: int = 1, key: Any = None) -> None:
        """Record ``n`` kept examples; with ``key``, one seen again (next epoch) counts once."""
        if key is not None:
            if ("kept", key) in self._seen:
                return
            self._seen.add(("kept", key))
        self.kept += n

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "DataReport") -> "DataReport":
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.modified.update(other.modified)
        for k, v in other.examples.items():
            bucket = self.examples.setdefault(k, [])
            bucket.extend(v[:max(0, self.max_examples - len(bucket))])
        return self

    def get_state(self) -> dict:
        """Counts, messages and the keys already seen, as JSON (stored with a data iterator's
        position in a checkpoint, so a resumed run's report covers the whole run)."""
        groups: dict[tuple, list] = {}
        for entry in self._seen:
            groups.setdefault(entry[:-1], []).append(entry[-1])
        seen = [{"tag": list(tag), **_encode_keys(keys)} for tag, keys in sorted(groups.items())]
        return {"kept": self.kept, "skipped": dict(self.skipped),
                "modified": dict(self.modified), "examples": self.examples, "seen": seen}

    def set_state(self, state: dict) -> None:
        """Replaces this report's counts by a :meth:`get_state`'s."""
        self.kept = int(state["kept"])
        self.skipped = collections.Counter(state["skipped"])
        self.modified = collections.Counter(state["modified"])
        self.examples = {k: list(v) for k, v in state["examples"].items()}
        self._seen = {(*g["tag"], key) for g in state["seen"] for key in _decode_keys(g)}

    def to_dict(self) -> dict:
        return {"name": self.name, "kept": self.kept, "skipped": dict(self.skipped),
                "modified": dict(self.modified), "examples": self.examples}

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, ensure_ascii=False)

    def summary(self) -> str:
        """A human-readable multi-line summary for experiment logs."""
        lines = [f"[{self.name}] kept {self.kept}, skipped {self.num_skipped}"
                 + (f", modified {sum(self.modified.values())}" if self.modified else "")]
        for kind, counter in (("skipped", self.skipped), ("modified", self.modified)):
            for reason, n in sorted(counter.items()):
                lines.append(f"  {kind} {reason}: {n}")
                for msg in self.examples.get(f"{kind}:{reason}", []):
                    lines.append(f"    e.g. {msg[:300]}")
        return "\n".join(lines)


def _encode_keys(keys: list) -> dict:
    """Non-negative int keys (dataset indices) as a base64 bitmap; anything else as a list."""
    if all(isinstance(k, int) and k >= 0 for k in keys):
        bits = np.zeros(max(keys, default=-1) + 1, bool)
        bits[keys] = True
        packed = np.packbits(bits, bitorder="little").tobytes()
        return {"bitmap": base64.b64encode(packed).decode("ascii")}
    return {"keys": sorted(keys, key=repr)}


def _decode_keys(group: dict) -> list:
    if "bitmap" in group:
        packed = np.frombuffer(base64.b64decode(group["bitmap"]), np.uint8)
        return np.flatnonzero(np.unpackbits(packed, bitorder="little")).tolist()
    return [tuple(k) if isinstance(k, list) else k for k in group["keys"]]


def iter_jsonl(path, *, report: DataReport | None = None, on_error: str = "raise"):
    """Yields ``(line_number, parsed_object)`` from a JSONL file, 1-based line numbers.

    Bytes that are not UTF-8 and malformed JSON raise :class:`DataError` (``"path:line"``) or,
    with ``on_error="skip"``, are counted in ``report`` and skipped. Blank lines are ignored.
    Gzip files (recognised by their magic bytes) are decompressed on the fly. A UTF-8 byte order
    mark at the start of the file (Windows editors and Excel's "CSV UTF-8" write one) is
    dropped.
    """
    path = str(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(where, "not_utf8", f"bytes are not valid UTF-8 at byte "
                                    f"{e.start} of the line ({raw[e.start:e.start + 4]!r})") from e
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(where, "bad_json", f"malformed JSON at column {e.colno}: "
                                    f"{e.msg}") from e
            except DataError as e:
                handle_error(e, report, on_error)
                continue
            yield lineno, obj


def handle_error(err: DataError, report: "DataReport | None", on_error: str) -> None:
    """Raises ``err`` (``on_error="raise"``) or counts it as a skip in ``report``."""
    if on_error == "raise":
        raise err
    if report is None:
        raise ValueError("on_error='skip' needs a DataReport to count skipped records") from err
    report.skip_error(err, key=err.where)
