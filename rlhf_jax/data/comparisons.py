"""Comparison (ranking) data: the JSONL schema, its reader/writer, labeling export, TFDS builder.

Schema, one JSON object per line and per prompt::

    {"id": str, "prompt": str, "responses": [str]*K, "ranks": [int]*K, "labeler": str,
     "policies": [str]*K, "gold_scores": [float]*K  (optional)}

``ranks[i]`` is the labeler's rank of response ``i``: 0 = best, equal values = tie, every value in
``[0, K)``. ``K >= 2``. Unknown extra fields are ignored. The collection experiment writes this
format with :func:`write_comparisons`; a labeling UI round-trips it through
:func:`export_for_labeling` / :func:`import_rankings`.

An empty or whitespace-only response is a valid response: it is what a policy wrote (a chat model
may end its turn after a newline), and ranking it below the others is what teaches a reward model
not to pay for it; it is scored as the prompt followed by EOS.

Bad records (malformed JSON, bytes that are not UTF-8, a missing or wrongly typed field,
``ranks``/``policies``/``gold_scores`` whose length is not K, a rank
outside ``[0, K)``, a duplicate id, a K other than the K of the first record of the file or split)
raise :class:`~rlhf_jax.data.errors.DataError` naming the file, line, field and what was expected
(``on_error="raise"``, the default), or are skipped and counted in a
:class:`~rlhf_jax.data.errors.DataReport` (``on_error="skip"``). Blank lines are allowed; a file
with no record at all is an error (``empty_file``). A UTF-8 byte order mark at the start of a file
(Excel's "CSV UTF-8", Windows editors) is accepted and dropped.

Ties are allowed, but a data set in which every ranking is a full tie teaches a reward model
nothing: :func:`count_untied_pairs` counts the informative pairs and
:func:`require_untied_pairs` turns "none" into an error naming the file.

TFDS: :class:`Comparisons` (``rlhf_comparisons``) builds one split per JSONL file name
(``train.jsonl`` or ``train-*.jsonl`` -> ``train``; ``eval.jsonl`` -> ``eval``); see
:func:`build_comparisons`, which by default requires a ``train`` split.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import pathlib
import re
from typing import Any, Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import tfds_utils
from rlhf_jax.data.errors import DataError, DataReport, handle_error, iter_jsonl

REQUIRED = {"id": str, "prompt": str, "responses": list, "ranks": list, "labeler": str,
            "policies": list}


def _type_name(x) -> str:
    return "null" if x is None else type(x).__name__


def validate_comparison(obj: Any, where: str, *, require_ranks: bool = True) -> dict:
    """Checks one record against the schema and returns a normalised copy.

    Args:
      obj: the parsed JSON value.
      where: location for error messages (``"path:line"``).
      require_ranks: when False (records sent out for labeling) ``ranks`` may be absent or null.

    Returns:
      ``dict`` with exactly the schema fields; ``gold_scores`` is present only if given.

    Raises:
      DataError: naming ``where``, the field and what was expected.
    """
    if not isinstance(obj, dict):
        raise DataError(where, "wrong_type", f"expected a JSON object, got {_type_name(obj)}")
    for field, typ in REQUIRED.items():
        if field == "ranks" and not require_ranks and obj.get("ranks") is None:
            continue
        if field not in obj:
            raise DataError(where, "missing_field", f"missing (expected {typ.__name__})", field)
        if not isinstance(obj[field], typ):
            raise DataError(where, "wrong_type", f"expected {typ.__name__}, got "
                            f"{_type_name(obj[field])} {str(obj[field])[:40]!r}", field)
    responses = obj["responses"]
    k = len(responses)
    if k < 2:
        raise DataError(where, "too_few_responses", f"expected K >= 2 responses, got {k}",
                        "responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(where, "wrong_type", f"expected str, got {_type_name(r)}",
                            f"responses[{i}]")
    out = {"id": obj["id"], "prompt": obj["prompt"], "responses": list(responses),
           "labeler": obj["labeler"]}
    policies = obj["policies"]
    if len(policies) != k:
        raise DataError(where, "length_mismatch", f"expected K={k} entries (one per response), "
                        f"got {len(policies)}", "policies")
    for i, p in enumerate(policies):
        if not isinstance(p, str):
            raise DataError(where, "wrong_type", f"expected str, got {_type_name(p)}",
                            f"policies[{i}]")
    out["policies"] = list(policies)
    ranks = obj.get("ranks")
    if ranks is not None or require_ranks:
        if len(ranks) != k:
            raise DataError(where, "rank_mismatch", f"expected K={k} ranks (one per response), "
                            f"got {len(ranks)}", "ranks")
        for i, r in enumerate(ranks):
            if isinstance(r, bool) or not isinstance(r, int):
                raise DataError(where, "wrong_type", f"expected int, got {_type_name(r)} {r!r}",
                                f"ranks[{i}]")
            if not 0 <= r < k:
                raise DataError(where, "rank_mismatch", f"expected a rank in [0, {k}), got {r}",
                                f"ranks[{i}]")
        out["ranks"] = list(ranks)
    else:
        out["ranks"] = None
    if obj.get("gold_scores") is not None:
        gs = obj["gold_scores"]
        if not isinstance(gs, list) or len(gs) != k:
            raise DataError(where, "length_mismatch", f"expected a list of K={k} floats, got "
                            f"{_type_name(gs)} of length "
                            f"{len(gs) if isinstance(gs, list) else '-'}",
                            "gold_scores")
        for i, g in enumerate(gs):
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
                raise DataError(where, "wrong_type", f"expected a finite number, got {g!r}",
                                f"gold_scores[{i}]")
        out["gold_scores"] = [float(g) for g in gs]
    return out


class _SameK:
    """Remembers K (number of responses) of the first record of a file or split.

    ``check`` raises :class:`DataError` (reason ``mixed_k``) for a record with another K, naming
    both places: the reward-model losses and batches assume one K per split.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.k: int | None = None
        self.where: str | None = None

    def check(self, rec: Mapping, where: str) -> None:
        if not self.enabled:
            return
        k = len(rec["responses"])
        if self.k is None:
            self.k, self.where = k, where
        elif k != self.k:
            raise DataError(where, "mixed_k", f"expected K={self.k} responses as in the first "
                            f"record ({self.where}), got K={k}; every record of a split must have "
                            "the same K", "responses")


def _read_jsonl_records(path, check, *, on_error: str, report: DataReport | None,
                        same_k: _SameK, with_location: bool = False,
                        seen: dict[str, str] | None = None) -> list[dict]:
    """Validated records of a comparisons JSONL file: the loop shared by the readers.

    ``check(obj, where)`` validates one parsed line and returns the record (or raises
    :class:`DataError`); an id already in ``seen`` (id -> ``"path:line"``, updated; shared by
    the files of one split), a K that differs from ``same_k``'s and a file without any record are
    errors here (raised or counted per ``on_error``).
    """
    out = []
    seen = {} if seen is None else seen
    skipped_before = report.num_skipped if report is not None else 0
    n_lines = 0
    for lineno, obj in iter_jsonl(path, report=report, on_error=on_error):
        n_lines += 1
        where = f"{path}:{lineno}"
        try:
            rec = check(obj, where)
            if rec["id"] in seen:
                raise DataError(where, "duplicate_id", f"id {rec['id']!r} already used at "
                                f"{seen[rec['id']]}; expected unique ids", "id")
            same_k.check(rec, where)
        except DataError as e:
            handle_error(e, report, on_error)
            continue
        seen[rec["id"]] = where
        if with_location:
            rec["_where"] = where
        out.append(rec)
        if report is not None:
            report.keep()
    skipped_here = (report.num_skipped if report is not None else 0) - skipped_before
    if not n_lines and not skipped_here:
        handle_error(DataError(str(path), "empty_file", "no records: expected one JSON "
                               "comparison object per line, the file is empty or blank"),
                     report, on_error)
    return out


def read_comparisons(path, *, on_error: str = "raise", report: DataReport | None = None,
                     require_ranks: bool = True, with_location: bool = False,
                     allow_mixed_k: bool = False) -> list[dict]:
    """Reads and validates a comparisons JSONL file (schema in the module docstring).

    Args:
      path: the ``.jsonl`` file (UTF-8, optionally with a byte order mark, optionally gzipped).
      on_error: ``"raise"`` (default) or ``"skip"`` (count bad records in ``report``).
      report: receives counts of kept and skipped records; required with ``"skip"``.
      require_ranks: False accepts records whose ``ranks`` is absent/null (to be labeled).
      with_location: add ``"_where": "path:line"`` to each record.
      allow_mixed_k: accept records whose number of responses differs from the first record's
        (by default a ``mixed_k`` error naming both lines).

    Returns:
      The valid records in file order.

    Raises:
      DataError: the first bad record (``on_error="raise"``), or a file without any record
        (``empty_file``).
    """
    return _read_jsonl_records(
        path, lambda obj, where: validate_comparison(obj, where, require_ranks=require_ranks),
        on_error=on_error, report=report, same_k=_SameK(not allow_mixed_k),
        with_location=with_location)


def count_untied_pairs(records) -> int:
    """Number of response pairs ``(i, j)``, ``i < j``, ranked differently, over all records.

    These are the pairs a reward model learns from: a record whose ranks are all equal (a full
    tie) contributes none. ``records`` are schema dicts, or anything indexable with ``len`` whose
    items have ``"ranks"`` (e.g. a split of :func:`build_comparisons`, undecoded).
    """
    if hasattr(records, "__len__") and hasattr(records, "__getitem__"):
        items = (records[i] for i in range(len(records)))
    else:
        items = iter(records)
    n = 0
    for rec in items:
        ranks = [int(r) for r in rec["ranks"]]
        n += sum(a != b for i, a in enumerate(ranks) for b in ranks[i + 1:])
    return n


def require_untied_pairs(records, where: str, *, minimum: int = 1) -> int:
    """:func:`count_untied_pairs`, or :class:`DataError` (``no_untied_pairs``) below ``minimum``.

    Args:
      records: as in :func:`count_untied_pairs`.
      where: the file or split the records came from, for the message.
      minimum: the fewest untied pairs accepted.

    Returns:
      The number of untied pairs.
    """
    records = records if hasattr(records, "__len__") else list(records)
    n = count_untied_pairs(records)
    if n < minimum:
        raise DataError(str(where), "no_untied_pairs", f"expected at least {minimum} untied "
                        f"pair(s) of responses, got {n} in {len(records)} records: every ranking "
                        "is a full tie, so there is no preference to learn from")
    return n


def write_comparisons(path, records: Iterable[Mapping], *, require_ranks: bool = True,
                      allow_mixed_k: bool = False) -> int:
    """Validates and writes records as JSONL (UTF-8, one object per line); returns the count.

    The file is written to ``path + ".tmp"`` and renamed, so a crash never leaves half a file.
    Raises :class:`DataError` (``"<records>#i"``) on the first invalid record, duplicate id, or
    (unless ``allow_mixed_k``) a record whose K differs from the first record's: what
    :func:`read_comparisons` would reject is never written.
    """
    path = str(path)
    tmp = path + ".tmp"
    seen = set()
    same_k = _SameK(not allow_mixed_k)
    n = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, r in enumerate(records):
                rec = validate_comparison(dict(r), f"<records>#{i}", require_ranks=require_ranks)
                if rec["id"] in seen:
                    raise DataError(f"<records>#{i}", "duplicate_id",
                                    f"id {rec['id']!r} repeated", "id")
                seen.add(rec["id"])
                same_k.check(rec, f"<records>#{i}")
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
    except BaseException:
        os.remove(tmp)
        raise
    os.replace(tmp, path)
    return n


# ----------------------------------------------------------------------------------------------
# Human labeling round trip.

CSV_COLUMNS = ("id", "prompt", "response_index", "response", "policy", "rank", "labeler")
CSV_REQUIRED = CSV_COLUMNS[:-1]  # `labeler` may come from import_rankings(labeler=...)


def export_for_labeling(records: Iterable[Mapping], path) -> int:
    """Writes records (``ranks`` absent or null) for a person to rank; returns the count.

    ``*.jsonl``: one object per prompt with ``"ranks": null`` to be replaced by a list of K ints.
    ``*.csv``: one row per response (columns ``id, prompt, response_index, response, policy,
    rank, labeler``) with ``rank`` (0 = best, ties allowed) and ``labeler`` left blank to fill in.
    The ``policy`` column is kept so :func:`import_rankings` can restore the record; hide it in
    the labeling view so labelers stay blind to which model wrote what. ``gold_scores`` are not
    exported.
    """
    recs = []
    for i, r in enumerate(records):
        r = dict(r)
        r.setdefault("labeler", "")
        rec = validate_comparison(r, f"<records>#{i}", require_ranks=False)
        rec["ranks"] = None
        rec.pop("gold_scores", None)
        recs.append(rec)
    path = str(path)
    if path.endswith(".csv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for rec in recs:
                for j, (resp, pol) in enumerate(zip(rec["responses"], rec["policies"])):
                    w.writerow([rec["id"], rec["prompt"], j, resp, pol, "", rec["labeler"]])
    else:
        with open(path, "w", encoding="utf-8") as f:
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return len(recs)


def import_rankings(path, *, labeler: str | None = None, on_error: str = "raise",
                    report: DataReport | None = None, allow_mixed_k: bool = False) -> list[dict]:
    """Reads a file produced by :func:`export_for_labeling` after a person filled in the ranks.

    Args:
      path: ``*.jsonl`` or ``*.csv`` (UTF-8; a byte order mark, as Excel's "CSV UTF-8" writes,
        is accepted). A CSV needs the columns ``id, prompt, response_index, response, policy,
        rank`` (``labeler`` is optional; any order; extra columns are ignored); rows may come in
        any order and are grouped by ``id``; rows whose cells are all blank are ignored.
      labeler: used where the file leaves ``labeler`` blank (an error if both are blank).
      on_error, report: as in :func:`read_comparisons`.
      allow_mixed_k: as in :func:`read_comparisons`.

    Returns:
      Validated comparison records (schema in the module docstring).

    Raises:
      DataError: naming the file, line and field: a CSV header without a required column, a row
        with a blank id, more or fewer cells than the header, rows of one id with different
        prompts, a response index or rank that is not an integer, an unranked record, a missing
        labeler, any schema error, a duplicate id (JSONL), a K that differs from the first
        record's, or a file without any record.
    """
    path = str(path)
    same_k = _SameK(not allow_mixed_k)
    if not path.endswith(".csv"):
        def check(obj, where):
            if isinstance(obj, dict) and not obj.get("labeler") and labeler:
                obj["labeler"] = labeler
            if isinstance(obj, dict) and obj.get("ranks") is None:
                raise DataError(where, "missing_field", "not ranked yet (expected a list of "
                                "K ints, got null)", "ranks")
            rec = validate_comparison(obj, where)
            if not rec["labeler"]:
                raise DataError(where, "missing_field", "expected a labeler name", "labeler")
            return rec
        return _read_jsonl_records(path, check, on_error=on_error, report=report, same_k=same_k)

    with open(path, "rb") as f:
        data = f.read()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        line = 1 + data[:bom + e.start].count(b"\n")
        raise DataError(f"{path}:{line}", "not_utf8", f"bytes are not valid UTF-8 at file byte "
                        f"{bom + e.start} ({data[bom + e.start:bom + e.start + 4]!r}); expected "
                        "a UTF-8 CSV") from e
    if not text.strip():
        handle_error(DataError(path, "empty_file", f"no header and no rows: expected a CSV with "
                               f"columns {list(CSV_COLUMNS)}"), report, on_error)
        return []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = list(reader.fieldnames or [])
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        hint = ""
        if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
            hint = " (one column only: is the file separated by ';' or tabs instead of commas?)"
        raise DataError(f"{path}:1", "missing_field", f"CSV header lacks columns {missing}; "
                        f"expected {list(CSV_COLUMNS)} (labeler optional), got {header}{hint}")
    groups: dict[str, dict] = {}
    order = []
    n_rows = 0
    for row in reader:
        where = f"{path}:{reader.line_num}"
        extra = row.pop(None, None)  # cells beyond the header
        if not extra and all(not (v or "").strip() for v in row.values()):
            continue  # a blank row, e.g. the ",,,," spreadsheets write after the data
        n_rows += 1
        rid = row["id"]
        if not (rid or "").strip():
            handle_error(DataError(where, "missing_field", "expected a non-empty id", "id"),
                         report, on_error)
            continue
        g = groups.get(rid)
        if g is None:
            g = groups[rid] = {"id": rid, "prompt": row["prompt"], "rows": [], "where": where,
                               "labeler": (row.get("labeler") or "").strip(), "error": None}
            order.append(rid)
        g["rows"].append((where, row))
        if g["error"] is None:
            if extra or any(row[c] is None for c in CSV_REQUIRED):
                n_cells = len(header) + len(extra or []) - sum(v is None for v in row.values())
                g["error"] = DataError(where, "wrong_type", f"row has {n_cells} cells, expected "
                                       f"{len(header)} as in the header (a stray or missing "
                                       "separator? quote cells that contain commas)")
            elif row["prompt"] != g["prompt"]:
                g["error"] = DataError(where, "prompt_mismatch", f"id {rid!r}: expected the "
                                       f"prompt of {g['where']} ({g['prompt'][:40]!r}), got "
                                       f"{row['prompt'][:40]!r}", "prompt")
        if not g["labeler"] and (row.get("labeler") or "").strip():
            g["labeler"] = row["labeler"].strip()
    out = []
    for rid in order:
        g = groups[rid]
        try:
            if g["error"] is not None:
                raise g["error"]
            rows = sorted(g["rows"], key=lambda wr: _csv_int(wr[0], wr[1], "response_index"))
            ranks = [_csv_int(w, r, "rank") for w, r in rows]
            idx = [_csv_int(w, r, "response_index") for w, r in rows]
            if idx != list(range(len(rows))):
                raise DataError(g["where"], "rank_mismatch", f"id {rid!r}: expected response_index "
                                f"0..{len(rows) - 1}, got {idx}", "response_index")
            obj = {"id": rid, "prompt": g["prompt"], "responses": [r["response"] for _, r in rows],
                   "policies": [r["policy"] for _, r in rows], "ranks": ranks,
                   "labeler": g["labeler"] or labeler or ""}
            rec = validate_comparison(obj, g["where"])
            if not rec["labeler"]:
                raise DataError(g["where"], "missing_field", "expected a labeler name", "labeler")
            same_k.check(rec, g["where"])
        except DataError as e:
            handle_error(e, report, on_error)
            continue
        out.append(rec)
        if report is not None:
            report.keep()
    if not n_rows:
        handle_error(DataError(path, "empty_file", f"a header but no rows: expected one row per "
                               f"response with columns {list(CSV_COLUMNS)}"), report, on_error)
    return out


def text_prefix_newlines(path, byte_offset: int) -> int:
    """Number of newlines in the first ``byte_offset`` bytes of ``path`` (for line numbers)."""
    with open(path, "rb") as f:
        return f.read(byte_offset).count(b"\n")


def _csv_int(where: str, row: Mapping[str, str], field: str) -> int:
    v = (row.get(field) or "").strip()
    if not re.fullmatch(r"-?\d+", v):
        raise DataError(where, "wrong_type" if v else "missing_field",
                        f"expected an integer, got {v!r}", field)
    return int(v)


# ----------------------------------------------------------------------------------------------
# TFDS.

def comparison_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "prompt": tfds.features.Text(),
        "responses": tfds.features.Sequence(tfds.features.Text()),
        "ranks": tfds.features.Sequence(np.int32),
        "labeler": tfds.features.Text(),
        "policies": tfds.features.Sequence(tfds.features.Text()),
        "gold_scores": tfds.features.Sequence(np.float32),  # empty when the file had none
        "source": tfds.features.Text(),  # "file:line", to trace an example back to its file
    })


def _comparison_example(rec: dict, where: str) -> dict:
    return {"id": rec["id"], "prompt": rec["prompt"], "responses": rec["responses"],
            "ranks": np.asarray(rec["ranks"], np.int32), "labeler": rec["labeler"],
            "policies": rec["policies"],
            "gold_scores": np.asarray(rec.get("gold_scores", []), np.float32), "source": where}


def split_files(source) -> dict[str, list[pathlib.Path]]:
    """Maps split names to JSONL files.

    ``source`` is a directory (every ``*.jsonl`` and ``*.jsonl.gz`` in it; split = file name up
    to the first ``-`` or ``.``: ``train.jsonl``, ``train-00001.jsonl`` -> ``train``, read in
    that order), a single file (split ``train``), or a mapping ``{split: path or [paths]}``.
    Gzipped files are read as they are (:func:`rlhf_jax.data.errors.iter_jsonl`).
    """
    if isinstance(source, Mapping):
        out = {}
        for split, paths in source.items():
            paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
            out[split] = [pathlib.Path(p) for p in paths]
    else:
        p = pathlib.Path(source)
        if p.is_dir():
            out = {}
            for f in sorted([*p.glob("*.jsonl"), *p.glob("*.jsonl.gz")]):
                split = re.split(r"[-.]", f.name, maxsplit=1)[0]
                out.setdefault(split, []).append(f)
            for split in out:  # `train.jsonl` before `train-00001.jsonl`, then by name
                out[split].sort(key=lambda f, s=split: (f.name.split(".", 1)[0] != s, f.name))
            if not out:
                found = sorted(f.name for f in p.iterdir())[:10]
                raise FileNotFoundError(f"{p}: no *.jsonl or *.jsonl.gz files (found {found}); "
                                        "expected train.jsonl or train-*.jsonl, optionally "
                                        "eval.jsonl")
        elif p.exists():
            out = {"train": [p]}
        else:
            raise FileNotFoundError(f"comparison source {p} does not exist")
    for split, paths in out.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise ValueError(f"split name {split!r} (from {paths}) is not a valid TFDS split name")
        for f in paths:
            if not f.exists():
                raise FileNotFoundError(f"comparison file {f} (split {split!r}) does not exist")
    return out


class Comparisons(tfds_utils.RlhfBuilder):
    """TFDS builder for comparisons JSONL written by this project (schema in module docstring).

    Args (besides TFDS's ``data_dir``, ``config``, ``version``):
      source: directory, file or ``{split: paths}`` (see :func:`split_files`).
      on_error: ``"raise"`` or ``"skip"`` (counted in ``self.report``).
      allow_mixed_k: accept records of one split with different numbers of responses (by
        default a ``mixed_k`` error naming the record and the split's first record).

    Ids must be unique within a split (across its files). A split without any valid record raises
    :class:`DataError` (``empty_split``) whatever ``on_error`` says: TFDS cannot write it.
    """
    name = "rlhf_comparisons"
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "Rankings of K responses per prompt (rlhf_jax comparisons JSONL)."

    def __init__(self, *, source=None, allow_mixed_k: bool = False, **kwargs):
        self.source = source
        self.allow_mixed_k = allow_mixed_k
        super().__init__(**kwargs)

    def _features(self):
        return comparison_features()

    def _split_generators(self, dl_manager):
        if self.source is None:
            raise ValueError("Comparisons builder needs source= (JSONL directory/file/mapping) "
                             "to build; it is only optional when reading a built dataset")
        return {split: self._generate_examples(split, paths)
                for split, paths in split_files(self.source).items()}

    def _generate_examples(self, split, paths):
        n = 0  # integer keys: with disable_shuffling TFDS orders examples by key
        same_k, seen = _SameK(not self.allow_mixed_k), {}
        skipped_before = self.report.num_skipped
        for path in paths:
            for rec in _read_jsonl_records(path, validate_comparison, on_error=self.on_error,
                                           report=self.report, same_k=same_k,
                                           with_location=True, seen=seen):
                where = rec.pop("_where")
                yield n, _comparison_example(rec, where)
                n += 1
        if not n:
            names = ", ".join(str(p) for p in paths)
            raise DataError(names, "empty_split", f"split {split!r} has no valid record "
                            f"({self.report.num_skipped - skipped_before} skipped); expected at "
                            "least one comparison")


def build_comparisons(source, data_dir: str | None = None, *, name: str = "default",
                      on_error: str = "raise", rebuild_if_changed: bool = True,
                      require_splits: Iterable[str] = ("train",), allow_mixed_k: bool = False):
    """Builds (or reuses) ``rlhf_comparisons`` from JSONL; returns ``(builder, {split: source})``.

    The dataset lives in ``data_dir/rlhf_comparisons/<name>/1.0.0`` (``name`` becomes a TFDS
    builder config, so several comparison sets can share a ``data_dir``). A fingerprint of the
    source bytes is stored with it; a changed source is rebuilt (``rebuild_if_changed``) or
    raises.

    Args:
      source: directory, file or ``{split: paths}`` (see :func:`split_files`).
      data_dir: TFDS data directory (default :func:`tfds_utils.default_data_dir`).
      name: builder config name.
      on_error: ``"raise"`` or ``"skip"`` bad records (counted in ``builder.report``).
      rebuild_if_changed: rebuild when the source bytes changed (else raise).
      require_splits: splits that must exist, checked before anything is built.
      allow_mixed_k: see :class:`Comparisons`.

    Raises:
      FileNotFoundError: the source does not exist, or lacks a required split (the message names
        the folder and the expected file names, e.g. ``train.jsonl`` or ``train-*.jsonl``).
      DataError: a bad record (``on_error="raise"``), an empty file, a split with no valid record.
    """
    data_dir = data_dir or tfds_utils.default_data_dir()
    files = split_files(source)
    for split in require_splits:
        if split not in files:
            found = {s: [f.name for f in fs] for s, fs in files.items()}
            if isinstance(source, Mapping):
                raise FileNotFoundError(f"comparison source mapping has no {split!r} split; "
                                        f"expected a {split!r} key (got {found})")
            raise FileNotFoundError(f"{source}: no {split!r} split; expected {split}.jsonl or "
                                    f"{split}-*.jsonl (found {found})")
    fp = tfds_utils.file_fingerprint([f for fs in files.values() for f in fs])
    config = tfds.core.BuilderConfig(name=name, description=f"source fingerprint {fp}")
    kwargs = dict(source=source, data_dir=data_dir, config=config, on_error=on_error,
                  allow_mixed_k=allow_mixed_k)
    builder = Comparisons(**kwargs)
    fp_file = pathlib.Path(builder.data_dir) / "source_fingerprint.txt"
    mode = None
    if builder.is_prepared():
        old = fp_file.read_text().strip() if fp_file.exists() else None
        if old != fp:
            if not rebuild_if_changed:
                raise ValueError(f"{builder.data_dir} was built from other files (fingerprint "
                                 f"{old} != {fp}); pass another name= or rebuild_if_changed=True")
            mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    dl = tfds.download.DownloadConfig(download_mode=mode) if mode else None
    if mode:
        builder = Comparisons(**kwargs)
    sources = tfds_utils.prepare(builder, download_config=dl)
    fp_file.write_text(fp + "\n")
    return builder, sources


def decode_comparison(example: Mapping[str, Any]) -> dict:
    """A data-source example of ``rlhf_comparisons`` as schema-like Python values."""
    ex = tfds_utils.decode(example)
    ex["responses"] = list(ex["responses"])
    ex["policies"] = list(ex["policies"])
    ex["ranks"] = [int(r) for r in ex["ranks"]]
    gs = np.asarray(ex.get("gold_scores", []), np.float32)
    if gs.size:
        ex["gold_scores"] = [float(g) for g in gs]
    else:
        ex.pop("gold_scores", None)
    return ex
