"""Between the comparisons JSONL files and the labeling database: loading items, exporting ranks.

* :func:`find_sources` / :func:`load_sources`: the files ``serve`` labels. A source is a collect
  workdir (its ``to_label/`` folder, written by ``experiments.collect --labeler export``), a
  folder of ``*.jsonl`` files, or one ``.jsonl`` file. The split of a file is its name up to the
  first ``-`` or ``.`` (``train.jsonl`` -> ``train``), as in
  :func:`rlhf_jax.data.comparisons.split_files`. Records are validated with
  :func:`~rlhf_jax.data.comparisons.read_comparisons` (``ranks`` may be null); a bad record
  raises :class:`~rlhf_jax.data.errors.DataError` naming file, line and field.
* :func:`export_rankings`: one ``<split>.jsonl`` per split in the comparisons schema (written with
  :func:`~rlhf_jax.data.comparisons.write_comparisons`), readable by
  :func:`~rlhf_jax.data.comparisons.import_rankings`, so ``python -m experiments.collect
  --labeler import --rankings-file <out>`` finishes the collect stage. ``labeler`` is the
  labeler's name; an item ranked by one labeler keeps its id, an item ranked by several becomes
  one record per labeler with id ``<id>#<labeler>``.
"""
from __future__ import annotations

import os
import pathlib
import re
import sys
from typing import Mapping

from rlhf_jax.data import comparisons
from rlhf_jax.labeling.store import LabelRow, LabelStore


def find_sources(source: str | os.PathLike) -> dict[str, list[pathlib.Path]]:
    """``{split: [jsonl files]}`` for a collect workdir, a folder of JSONL files or one file."""
    p = pathlib.Path(source)
    if p.is_file():
        if p.suffix != ".jsonl":
            raise ValueError(f"{p}: expected a .jsonl file, a folder of them, or a collect "
                             f"workdir with to_label/*.jsonl")
        return comparisons.split_files({re.split(r"[-.]", p.name, maxsplit=1)[0]: p})
    if not p.is_dir():
        raise FileNotFoundError(f"labeling source {p} does not exist")
    folder = p / "to_label" if any((p / "to_label").glob("*.jsonl")) else p
    if not any(folder.glob("*.jsonl")):
        raise FileNotFoundError(f"no *.jsonl files in {p} (nor in {p / 'to_label'}); run "
                                f"`python -m experiments.collect --labeler export` first")
    return comparisons.split_files(folder)


def load_sources(store: LabelStore, source: str | os.PathLike) -> dict:
    """Validates every source record and adds the new ones to ``store``.

    Returns:
      ``{"files": [...], "splits": {split: records}, "added": n, "present": m}``.
    """
    files = find_sources(source)
    splits, where = {}, {}
    for split, paths in files.items():
        recs = []
        for path in paths:
            recs += comparisons.read_comparisons(path, require_ranks=False)
        ids = [r["id"] for r in recs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"split {split!r} ({', '.join(map(str, paths))}): id {dup!r} occurs "
                             f"in more than one file; ids must be unique within a split")
        splits[split] = recs
        where[split] = ", ".join(map(str, paths))
    added, present = store.add_records(splits, where)
    return {"files": [str(f) for fs in files.values() for f in fs],
            "splits": {s: len(r) for s, r in splits.items()}, "added": added, "present": present}


def export_records(rows: list[LabelRow]) -> dict[str, list[dict]]:
    """``{split: comparison records}``: one per (item, labeler); see the module docstring."""
    per_item: dict[tuple[str, str], int] = {}
    for r in rows:
        per_item[(r.split, r.rid)] = per_item.get((r.split, r.rid), 0) + 1
    out: dict[str, list[dict]] = {}
    for r in rows:
        rec = {"id": r.rid if per_item[(r.split, r.rid)] == 1 else f"{r.rid}#{r.labeler}",
               "prompt": r.record["prompt"], "responses": list(r.record["responses"]),
               "ranks": list(r.ranks), "labeler": r.labeler,
               "policies": list(r.record["policies"])}
        if r.record.get("gold_scores") is not None:
            rec["gold_scores"] = list(r.record["gold_scores"])
        out.setdefault(r.split, []).append(rec)
    return out


def export_rankings(db: str | os.PathLike, out_dir: str | os.PathLike, *,
                    splits: Mapping[str, int] | None = None) -> dict[str, int]:
    """Writes ``out_dir/<split>.jsonl`` for every split with at least one ranking.

    A split of the database without rankings gets no file and a warning on stderr: the collect
    stage's import needs one file per split (``train`` and ``eval``).

    Returns:
      ``{split: records written}`` (0 for the splits left out).
    """
    with LabelStore(db, create=False) as store:
        rows = store.labels()
        all_splits = dict(splits or store.splits())
    per_split = export_records(rows)
    out = pathlib.Path(out_dir)
    counts = {}
    for split in list(all_splits) + [s for s in per_split if s not in all_splits]:
        recs = per_split.get(split, [])
        if not recs:
            print(f"[labeling] warning: split {split!r} has no rankings yet; {out}/{split}.jsonl "
                  f"not written (experiments.collect --labeler import needs it)", file=sys.stderr)
            counts[split] = 0
            continue
        counts[split] = comparisons.write_comparisons(out / f"{split}.jsonl", recs)
    return counts
