"""The offline IMDB builder, from a small CSV in the package's exact format."""
import csv
import hashlib
import time

import pytest

from rlhf_jax.data import imdb
from rlhf_jax.data.errors import DataError

ROWS = [(f"Review number {i}.<br /><br />It was {'good' if i % 2 else 'bad'}  indeed.", str(i % 2),
         "imdb") for i in range(40)]
ROWS += [("a rotten tomatoes snippet .", "1", "rotten_tomatoes")] * 3
ROWS += [('Quotes "inside", commas, and\na newline', "0", "imdb")]


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "source"])
        w.writerows(rows)
    return path


def expected_split(text):
    b = hashlib.sha256(text.encode()).digest()[0] % 10
    return "lm" if b < 8 else "prompts" if b == 8 else "eval"


def test_builder_from_fixture_csv(tmp_path):
    p = write_csv(tmp_path / "reviews.csv", ROWS)
    builder, src = imdb.build_imdb(str(tmp_path / "tfds"), csv_path=p, config="fixture")
    imdb_rows = [(i, r) for i, r in enumerate(ROWS) if r[2] == "imdb"]
    got = {}
    for split, ds in src.items():
        for j in range(len(ds)):
            ex = ds[j]
            got[ex["id"].decode()] = (split, ex["text"].decode(), int(ex["label"]))
    assert len(got) == len(imdb_rows) == 41
    for i, (text, label, _) in imdb_rows:
        split, t, lab = got[f"imdb-{i}"]
        assert lab == int(label)
        assert "<br" not in t and "  " not in t
        assert t == imdb.clean_text(text)
        assert split == expected_split(t)
    assert got["imdb-0"][1] == "Review number 0.\n\nIt was bad indeed."
    assert builder.report.kept == 41 and builder.report.num_skipped == 0


def test_split_rule_hash_independent_of_order():
    texts = [f"text {i}" for i in range(2000)]
    splits = [imdb.split_of(t) for t in texts]
    frac = {s: splits.count(s) / len(texts) for s in imdb.SPLITS}
    assert abs(frac["lm"] - 0.8) < 0.05 and abs(frac["prompts"] - 0.1) < 0.03
    assert [imdb.split_of(t) for t in reversed(texts)] == splits[::-1]


def test_bad_rows_name_file_and_line(tmp_path):
    p = write_csv(tmp_path / "bad.csv", ROWS[:3] + [("fine text", "pos", "imdb")])
    with pytest.raises(DataError, match=r"bad.csv:5: field 'label': expected 0 or 1, got 'pos'"):
        list(imdb.read_imdb_csv(p))
    q = tmp_path / "bytes.csv"
    q.write_bytes(b"text,label,source\nok,1,imdb\n\"caf\xe9 au lait\",0,imdb\n")
    with pytest.raises(DataError, match=r"bytes.csv:3: field 'text'.*UTF-8"):
        list(imdb.read_imdb_csv(q))
    # skip mode: counted, the rest kept, through the builder.
    builder, src = imdb.build_imdb(str(tmp_path / "tfds"), csv_path=q, config="bytes",
                                   on_error="skip")
    assert sum(len(s) for s in src.values()) == 1
    assert builder.report.skipped == {"not_utf8": 1}


@pytest.mark.slow
def test_real_package_csv_build(tmp_path):
    t = time.perf_counter()
    _, src = imdb.build_imdb(str(tmp_path))
    sizes = {k: len(v) for k, v in src.items()}
    assert sum(sizes.values()) == 25000
    assert 19000 < sizes["lm"] < 21000 and 2000 < sizes["prompts"] < 3000
    print(f"IMDB build {time.perf_counter() - t:.1f} s: {sizes}")
