"""Comparison JSONL schema, reader/writer, labeling round trip, and the rlhf_comparisons builder."""
import json

import numpy as np
import pytest

from rlhf_jax.data import batching, comparisons
from rlhf_jax.data.errors import DataError, DataReport
from tests.data.conftest import write_jsonl


def make_records(n=6, k=3, gold=False):
    recs = []
    for i in range(n):
        r = {"id": f"q{i}", "prompt": f"Review {i}: the film", "labeler": "sim",
             "responses": [f" was good number {i}." * (1 + j) for j in range(k)],
             "policies": [f"pi{j}" for j in range(k)],
             "ranks": [(i + j) % k for j in range(k)]}
        if gold:
            r["gold_scores"] = [0.5 * j - i for j in range(k)]
        recs.append(r)
    return recs


def test_write_read_round_trip(tmp_path):
    recs = make_records(gold=True)
    recs[2]["prompt"] = "ünïcode “quotes” 日本"
    p = tmp_path / "train.jsonl"
    assert comparisons.write_comparisons(p, recs) == len(recs)
    assert comparisons.read_comparisons(p) == recs
    assert not (tmp_path / "train.jsonl.tmp").exists()


GOOD = make_records(1)[0]


def _with(**changes):
    r = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if v is KeyError:
            del r[k]
        else:
            r[k] = v
    return r


@pytest.mark.parametrize("line, reason, field", [
    ('{"id": "x", "prompt": ', "bad_json", None),
    (_with(ranks=KeyError), "missing_field", "ranks"),
    (_with(prompt=3), "wrong_type", "prompt"),
    (_with(responses="abc"), "wrong_type", "responses"),
    (_with(responses=["a", 7, "c"]), "wrong_type", "responses[1]"),
    (_with(ranks=[0, 1]), "rank_mismatch", "ranks"),
    (_with(ranks=[0, 1, 3]), "rank_mismatch", "ranks[2]"),
    (_with(ranks=[0, 1.5, 2]), "wrong_type", "ranks[1]"),
    (_with(policies=["a"]), "length_mismatch", "policies"),
    (_with(gold_scores=[1.0]), "length_mismatch", "gold_scores"),
    (["not", "an", "object"], "wrong_type", None),
])
def test_bad_record_raises_with_location(tmp_path, line, reason, field):
    p = write_jsonl(tmp_path / "c.jsonl", [make_records(1)[0], line])
    with pytest.raises(DataError) as e:
        comparisons.read_comparisons(p)
    assert e.value.reason == reason and e.value.field == field
    assert e.value.where == f"{p}:2"
    assert f"{p}:2" in str(e.value)
    if field:
        assert repr(field) in str(e.value)


def test_not_utf8_raises_with_line(tmp_path):
    p = tmp_path / "c.jsonl"
    good = json.dumps(GOOD).encode()
    p.write_bytes(good + b"\n" + b'{"id": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2.*not valid UTF-8") as e:
        comparisons.read_comparisons(p)
    assert e.value.reason == "not_utf8"


def test_skip_mode_counts_every_bad_line(tmp_path):
    recs = make_records(4)
    lines = [recs[0], "{oops", recs[1], _with(ranks=[0]), recs[2], _with(id="q0"), recs[3]]
    p = write_jsonl(tmp_path / "c.jsonl", lines)
    with open(p, "ab") as f:
        f.write(b"\xc3\x28\n\n")
    report = DataReport()
    got = comparisons.read_comparisons(p, on_error="skip", report=report)
    assert [r["id"] for r in got] == ["q0", "q1", "q2", "q3"]
    assert report.kept == 4
    assert dict(report.skipped) == {"bad_json": 1, "rank_mismatch": 1, "duplicate_id": 1,
                                    "not_utf8": 1}
    s = report.summary()
    assert "skipped 4" in s and "duplicate_id: 1" in s and "c.jsonl:6" in s


def test_writer_validates_and_leaves_no_file(tmp_path):
    recs = make_records(3)
    recs[1]["ranks"] = [0, 0]
    p = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=r"<records>#1.*ranks"):
        comparisons.write_comparisons(p, recs)
    assert not p.exists() and not (tmp_path / "out.jsonl.tmp").exists()


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_labeling_export_import_round_trip(tmp_path, suffix):
    recs = make_records(3)
    recs[0]["responses"][1] = 'has "quotes", commas\nand a newline'
    recs[1]["responses"][2], recs[2]["responses"][0] = "", " "  # blank responses are ranked too
    unranked = [{k: v for k, v in r.items() if k not in ("ranks", "labeler")} for r in recs]
    p = tmp_path / f"to_label.{suffix}"
    assert comparisons.export_for_labeling(unranked, p) == 3
    # A person fills in the ranks.
    if suffix == "jsonl":
        objs = [json.loads(line) for line in p.read_text().splitlines()]
        assert all(o["ranks"] is None for o in objs)
        for o, r in zip(objs, recs):
            o["ranks"] = r["ranks"]
        write_jsonl(p, objs)
    else:
        import csv
        rows = list(csv.DictReader(open(p, newline="", encoding="utf-8")))
        assert len(rows) == 9 and all(row["rank"] == "" for row in rows)
        by_id = {r["id"]: r for r in recs}
        for row in rows:
            row["rank"] = str(by_id[row["id"]]["ranks"][int(row["response_index"])])
        rows.reverse()  # row order must not matter
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=comparisons.CSV_COLUMNS)
            w.writeheader()
            w.writerows(rows)
    with pytest.raises(DataError, match="labeler"):
        comparisons.import_rankings(p)
    got = comparisons.import_rankings(p, labeler="sim")
    assert sorted(got, key=lambda r: r["id"]) == recs


def test_import_unranked_csv_row_is_an_error(tmp_path):
    p = tmp_path / "l.csv"
    comparisons.export_for_labeling([{k: v for k, v in GOOD.items() if k != "ranks"}], p)
    with pytest.raises(DataError, match=r"l.csv:2.*'rank'.*expected an integer"):
        comparisons.import_rankings(p, labeler="me")


def test_builder_counts_fields_and_round_trip_to_decoded_batch(tmp_path, tok):
    src = tmp_path / "src"
    src.mkdir()
    train, ev = make_records(8, gold=True), make_records(3)
    for r in ev:
        r["id"] = "e" + r["id"]
    comparisons.write_comparisons(src / "train.jsonl", train[:5])
    comparisons.write_comparisons(src / "train-00001.jsonl", train[5:])
    comparisons.write_comparisons(src / "eval.jsonl", ev)
    data_dir = str(tmp_path / "tfds")
    builder, sources = comparisons.build_comparisons(src, data_dir, name="round1")
    assert {k: len(v) for k, v in sources.items()} == {"train": 8, "eval": 3}
    got = [comparisons.decode_comparison(sources["train"][i]) for i in range(8)]
    for g, r in zip(got, train):
        assert g.pop("source").endswith((".jsonl:1", ".jsonl:2", ".jsonl:3", ".jsonl:4",
                                         ".jsonl:5"))
        assert g == r
    assert "gold_scores" not in comparisons.decode_comparison(sources["eval"][0])

    # TFDS -> batch -> decoded text equals the input.
    cfg = batching.LoaderConfig(batch_size=4, shuffle=False)
    b = batching.comparison_batches(sources["train"], tok, max_len=64, cfg=cfg)
    batches = list(b)
    assert len(batches) == 2 and b.report.num_skipped == 0
    for bi, batch in enumerate(batches):
        assert batch["tokens"].shape == (4, 3, 64) and batch["ranks"].shape == (4, 3)
        for row in range(4):
            rec = train[bi * 4 + row]
            np.testing.assert_array_equal(batch["ranks"][row], rec["ranks"])
            texts = batching.decode_rows(tok, batch["tokens"][row], batch["mask"][row])
            assert texts == [rec["prompt"] + resp for resp in rec["responses"]]
            resp = batching.decode_rows(tok, batch["tokens"][row], batch["response_mask"][row])
            assert resp == rec["responses"]

    # Idempotent: a second call reuses the data; a changed source is rebuilt.
    _, again = comparisons.build_comparisons(src, data_dir, name="round1")
    assert len(again["train"]) == 8
    comparisons.write_comparisons(src / "eval.jsonl", ev[:1])
    _, changed = comparisons.build_comparisons(src, data_dir, name="round1")
    assert len(changed["eval"]) == 1
    with pytest.raises(ValueError, match="fingerprint"):
        comparisons.write_comparisons(src / "eval.jsonl", ev[:2])
        comparisons.build_comparisons(src, data_dir, name="round1", rebuild_if_changed=False)


def test_a_folder_of_gzipped_jsonl_builds_like_plain_jsonl(tmp_path):
    import gzip
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    train, ev = make_records(5, gold=True), make_records(2)
    comparisons.write_comparisons(plain / "train.jsonl", train)
    comparisons.write_comparisons(plain / "eval.jsonl", ev)
    for name in ("train", "eval"):
        (packed / f"{name}.jsonl.gz").write_bytes(
            gzip.compress((plain / f"{name}.jsonl").read_bytes()))
    assert {k: [f.name for f in v] for k, v in comparisons.split_files(packed).items()} == {
        "eval": ["eval.jsonl.gz"], "train": ["train.jsonl.gz"]}
    _, a = comparisons.build_comparisons(plain, str(tmp_path / "a"))
    _, b = comparisons.build_comparisons(packed, str(tmp_path / "b"))
    for split in ("train", "eval"):
        got = [comparisons.decode_comparison(b[split][i]) for i in range(len(b[split]))]
        want = [comparisons.decode_comparison(a[split][i]) for i in range(len(a[split]))]
        assert [g.pop("source") for g in got] == [
            w.pop("source").replace(".jsonl:", ".jsonl.gz:").replace("plain", "packed")
            for w in want]
        assert got == want == (train if split == "train" else ev)
    with pytest.raises(FileNotFoundError, match=r"no \*.jsonl or \*.jsonl.gz files"):
        comparisons.split_files(tmp_path / "a")  # TFDS files only


def test_builder_skip_mode_reports(tmp_path):
    recs = make_records(3)
    p = write_jsonl(tmp_path / "train.jsonl", [recs[0], "{bad", recs[1], _with(id="z",
                                               responses=[None, "x", "y"]), recs[2]])
    with pytest.raises(DataError, match="train.jsonl:2"):
        comparisons.build_comparisons(p, str(tmp_path / "d1"))
    builder, src = comparisons.build_comparisons(p, str(tmp_path / "d2"), on_error="skip")
    assert len(src["train"]) == 3
    assert dict(builder.report.skipped) == {"bad_json": 1, "wrong_type": 1}
    saved = json.loads((builder.data_path / "build_report.json").read_text())
    assert saved["kept"] == 3 and saved["skipped"] == {"bad_json": 1, "wrong_type": 1}


def test_building_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """TFDS's metadata lookup for a fresh builder makes a temp folder it never removes; ours skip
    the lookup, so building (and re-opening) a dataset leaves the temp directory as it was."""
    import tempfile
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    p = write_jsonl(tmp_path / "train.jsonl", make_records(3))
    _, src = comparisons.build_comparisons(p, str(tmp_path / "d"))
    _, again = comparisons.build_comparisons(p, str(tmp_path / "d"))
    assert len(src["train"]) == len(again["train"]) == 3
    assert list(scratch.iterdir()) == []


def test_blank_responses_are_kept_and_scored_as_prompt_then_eos(tmp_path, tok):
    # A chat policy may end its turn right after a newline: the collector must write that
    # response (a crash here once lost a whole collection), and the reward model must see it,
    # one row per response, so that scores stay aligned with the records.
    recs = make_records(3)
    recs[1]["responses"][0], recs[2]["responses"][2] = "\n", ""
    p = tmp_path / "train.jsonl"
    assert comparisons.write_comparisons(p, recs) == 3
    assert comparisons.read_comparisons(p) == recs
    _, src = comparisons.build_comparisons(p, str(tmp_path / "tfds"))
    assert [comparisons.decode_comparison(src["train"][i])["responses"] for i in range(3)] == [
        r["responses"] for r in recs]
    b = batching.comparison_batches(recs, tok, max_len=96,
                                    cfg=batching.LoaderConfig(batch_size=3, shuffle=False))
    batch = next(iter(b))
    assert b.report.skipped == {} and batch["valid"].all()
    for i, j, text in ((1, 0, "\n"), (2, 2, "")):
        resp = batch["tokens"][i, j][batch["response_mask"][i, j]].tolist()
        assert resp == tok.encode(text) + [tok.eos_id]
        n_prompt = int(batch["mask"][i, j].sum()) - len(resp)
        assert batch["tokens"][i, j][:n_prompt].tolist() == tok.encode(recs[i]["prompt"])
    # A demonstration still has to say something: SFT skips a blank one (counted).
    assert batching.encode_prompt_response(tok, "P", "  ", 16) is None


def test_overlong_comparison_is_skipped_and_counted(tok):
    recs = make_records(3)
    recs[1]["responses"][2] = " very long response" * 80
    b = batching.comparison_batches(recs, tok, max_len=96,
                                    cfg=batching.LoaderConfig(batch_size=1, shuffle=False))
    rows = list(b)
    assert len(rows) == 2 and b.report.skipped == {"too_long": 1}
    assert "comparisons#1 response 2" in b.report.summary()
    with pytest.raises(DataError, match=r"comparisons#1 response 2.*max_len=96"):
        list(batching.comparison_batches(recs, tok, max_len=96, overlong="raise",
                                         cfg=batching.LoaderConfig(batch_size=1, shuffle=False)))


def test_build_cli_comparisons(tmp_path, capsys):
    from rlhf_jax.data import build
    comparisons.write_comparisons(tmp_path / "train.jsonl", make_records(5))
    assert build.main(["comparisons", "--source", str(tmp_path / "train.jsonl"),
                       "--data-dir", str(tmp_path / "tfds"), "--name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "rlhf_comparisons" in out and "train: 5 examples" in out
