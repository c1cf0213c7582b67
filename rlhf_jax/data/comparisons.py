"""Comparison (ranking) data: the JSONL schema, its reader/writer, labeling export, TFDS builder.

Schema, one JSON object per line and per prompt::

    {"id": str, "prompt": str, "responses": [str]*K, "ranks": [int]*K, "labeler": str,
     "policies": [str]*K, "gold_scores": [float]*K  (optional)}

``ranks[i]`` is the labeler's rank of response ``i``: 0 = best, equal values = tie, every value in
``[0, K)``. ``K >= 2``. Unknown extra fields are ignored. The collection experiment writes this
format with :func:`write_comparisons`; a labeling UI round-trips it through
:func:`export_for_labeling` / :func:`import_rankings`.

Bad records (malformed JSON, bytes that are not UTF-8, a missing or wrongly typed field, an empty
or whitespace-only response, ``ranks``/``policies``/``gold_scores`` whose length is not K, a rank
outside ``[0, K)``, a duplicate id) raise :class:`~rlhf_jax.data.errors.DataError` naming the file,
line, field and what was expected (``on_error="raise"``, the default), or are skipped and counted
in a :class:`~rlhf_jax.data.errors.DataReport` (``on_error="skip"``). Blank lines are allowed.

TFDS: :class:`Comparisons` (``rlhf_comparisons``) builds one split per JSONL file name
(``train.jsonl`` or ``train-*.jsonl`` -> ``train``; ``eval.jsonl`` -> ``eval``); see
:func:`build_comparisons`.
"""
from __future__ import annotations

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
        if not r.strip():
            raise DataError(where, "empty_response", "expected a non-empty response, got "
                            f"{r!r}", f"responses[{i}]")
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


def read_comparisons(path, *, on_error: str = "raise", report: DataReport | None = None,
                     require_ranks: bool = True, with_location: bool = False) -> list[dict]:
    """Reads and validates a comparisons JSONL file (schema in the module docstring).

    Args:
      path: the ``.jsonl`` file.
      on_error: ``"raise"`` (default) or ``"skip"`` (count bad records in ``report``).
      report: receives counts of kept and skipped records; required with ``"skip"``.
      require_ranks: False accepts records whose ``ranks`` is absent/null (to be labeled).
      with_location: add ``"_where": "path:line"`` to each record.

    Returns:
      The valid records in file order.
    """
    out, seen = [], {}
    for lineno, obj in iter_jsonl(path, report=report, on_error=on_error):
        where = f"{path}:{lineno}"
        try:
            rec = validate_comparison(obj, where, require_ranks=require_ranks)
            if rec["id"] in seen:
                raise DataError(where, "duplicate_id", f"id {rec['id']!r} already used at line "
                                f"{seen[rec['id']]}", "id")
        except DataError as e:
            handle_error(e, report, on_error)
            continue
        seen[rec["id"]] = lineno
        if with_location:
            rec["_where"] = where
        out.append(rec)
        if report is not None:
            report.keep()
    return out


def write_comparisons(path, records: Iterable[Mapping], *, require_ranks: bool = True) -> int:
    """Validates and writes records as JSONL (UTF-8, one object per line); returns the count.

    The file is written to ``path + ".tmp"`` and renamed, so a crash never leaves half a file.
    Raises :class:`DataError` (``"<records>#i"``) on the first invalid record or duplicate id.
    """
    path = str(path)
    tmp = path + ".tmp"
    seen = set()
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
                    report: DataReport | None = None) -> list[dict]:
    """Reads a file produced by :func:`export_for_labeling` after a person filled in the ranks.

    Args:
      path: ``*.jsonl`` or ``*.csv``.
      labeler: used where the file leaves ``labeler`` blank (an error if both are blank).
      on_error, report: as in :func:`read_comparisons`.

    Returns:
      Validated comparison records (schema in the module docstring).
    """
    path = str(path)
    if not path.endswith(".csv"):
        out = []
        for lineno, obj in iter_jsonl(path, report=report, on_error=on_error):
            where = f"{path}:{lineno}"
            try:
                if isinstance(obj, dict) and not obj.get("labeler") and labeler:
                    obj["labeler"] = labeler
                if isinstance(obj, dict) and obj.get("ranks") is None:
                    raise DataError(where, "missing_field", "not ranked yet (expected a list of "
                                    "K ints, got null)", "ranks")
                rec = validate_comparison(obj, where)
                if not rec["labeler"]:
                    raise DataError(where, "missing_field", "expected a labeler name", "labeler")
            except DataError as e:
                handle_error(e, report, on_error)
                continue
            out.append(rec)
            if report is not None:
                report.keep()
        return out
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        line = 1 + text_prefix_newlines(path, e.start)
        raise DataError(f"{path}:{line}", "not_utf8", f"bytes are not valid UTF-8 at file byte "
                        f"{e.start}") from e
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("id", "response_index", "response", "policy", "rank")
               if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}:1", "missing_field", f"CSV header lacks columns {missing}; "
                        f"expected {list(CSV_COLUMNS)}")
    groups: dict[str, dict] = {}
    order = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        rid = row["id"]
        g = groups.get(rid)
        if g is None:
            g = groups[rid] = {"id": rid, "prompt": row.get("prompt", ""), "rows": [],
                               "where": where, "labeler": (row.get("labeler") or "").strip()}
            order.append(rid)
        g["rows"].append((where, row))
        if not g["labeler"] and (row.get("labeler") or "").strip():
            g["labeler"] = row["labeler"].strip()
    out = []
    for rid in order:
        g = groups[rid]
        try:
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
        except DataError as e:
            handle_error(e, report, on_error)
            continue
        out.append(rec)
        if report is not None:
            report.keep()
    return out


def text_prefix_newlines(path, byte_offset: int) -> int:
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

    ``source`` is a directory (every ``*.jsonl`` in it; split = file name up to the first ``-``
    or ``.``: ``train.jsonl``, ``train-00001.jsonl`` -> ``train``, read in that order), a single
    file (split ``train``), or a mapping ``{split: path or [paths]}``.
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
            for f in sorted(p.glob("*.jsonl")):
                split = re.split(r"[-.]", f.name, maxsplit=1)[0]
                out.setdefault(split, []).append(f)
            for split in out:  # `train.jsonl` before `train-00001.jsonl`, then by name
                out[split].sort(key=lambda f, s=split: (f.stem != s, f.name))
            if not out:
                raise FileNotFoundError(f"no *.jsonl files in {p}")
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
    """
    name = "rlhf_comparisons"
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "Rankings of K responses per prompt (rlhf_jax comparisons JSONL)."

    def __init__(self, *, source=None, **kwargs):
        self.source = source
        super().__init__(**kwargs)

    def _features(self):
        return comparison_features()

    def _split_generators(self, dl_manager):
        if self.source is None:
            raise ValueError("Comparisons builder needs source= (JSONL directory/file/mapping) "
                             "to build; it is only optional when reading a built dataset")
        return {split: self._generate_examples(paths)
                for split, paths in split_files(self.source).items()}

    def _generate_examples(self, paths):
        n = 0  # integer keys: with disable_shuffling TFDS orders examples by key
        for path in paths:
            for rec in read_comparisons(path, on_error=self.on_error, report=self.report,
                                        with_location=True):
                where = rec.pop("_where")
                yield n, _comparison_example(rec, where)
                n += 1


def build_comparisons(source, data_dir: str | None = None, *, name: str = "default",
                      on_error: str = "raise", rebuild_if_changed: bool = True):
    """Builds (or reuses) ``rlhf_comparisons`` from JSONL; returns ``(builder, {split: source})``.

    The dataset lives in ``data_dir/rlhf_comparisons/<name>/1.0.0`` (``name`` becomes a TFDS
    builder config, so several comparison sets can share a ``data_dir``). A fingerprint of the
    source bytes is stored with it; a changed source is rebuilt (``rebuild_if_changed``) or
    raises.
    """
    data_dir = data_dir or tfds_utils.default_data_dir()
    files = split_files(source)
    fp = tfds_utils.file_fingerprint([f for fs in files.values() for f in fs])
    config = tfds.core.BuilderConfig(name=name, description=f"source fingerprint {fp}")
    builder = Comparisons(source=source, data_dir=data_dir, config=config, on_error=on_error)
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
        builder = Comparisons(source=source, data_dir=data_dir, config=config, on_error=on_error)
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
