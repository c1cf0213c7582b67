"""TL;DR and HH-RLHF builders, offline: TFDS's real download path (downloader, cache, checksums,
gzip extraction) runs, with only the HTTP request answered from small files in the exact
upstream formats."""
import contextlib
import gzip
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader

from rlhf_jax.data import batching, hh, tfds_utils, tldr
from rlhf_jax.data.errors import DataError


class _Response:
    def __init__(self, url, body):
        self.url, self.headers, self.body = url, {"Content-length": str(len(body))}, body


@pytest.fixture
def serve(monkeypatch):
    """Answers TFDS's HTTP GETs from a dict {url: bytes}; any other URL fails the test."""
    files, fetched = {}, []

    @contextlib.contextmanager
    def fake_open_url(url, **kwargs):
        if url not in files:
            raise AssertionError(f"unexpected download of {url}")
        fetched.append(url)
        r = _Response(url, files[url])
        yield r, [r.body[i:i + 7] for i in range(0, len(r.body), 7)]

    monkeypatch.setattr(downloader, "_open_url", fake_open_url)
    return files, fetched


def jsonl_bytes(objs):
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs).encode()


SFT = [{"id": f"t3_{i}", "subreddit": "relationships", "title": f"Title {i}",
        "post": f"My post {i}, long story.", "summary": f"short summary {i}"} for i in range(5)]


def comparison(i, choice, split="train", **over):
    obj = {"info": {"id": f"t3_c{i}", "post": f"Post {i} text", "title": f"T{i}",
                    "subreddit": "AskReddit"},
           "summaries": [{"text": f" first {i}", "policy": "sup2", "note": None},
                         {"text": f" second {i}", "policy": "ref", "note": None}],
           "choice": choice, "worker": f"w{i % 3}", "batch": "batch3", "split": split,
           "extra": {"confidence": 7}}
    obj.update(over)
    return obj


def test_tldr_sft(tmp_path, serve, tok):
    files, fetched = serve
    files[tldr.SFT_URLS["train"]] = jsonl_bytes(SFT[:3] + [dict(SFT[3], summary="  "),
                                                           "{broken", SFT[4]])
    files[tldr.SFT_URLS["valid"]] = jsonl_bytes(SFT[:2])
    files[tldr.SFT_URLS["test"]] = jsonl_bytes(SFT[:1])
    builder = tldr.TldrSft(data_dir=str(tmp_path))
    src = tfds_utils.prepare(builder)
    assert sorted(fetched) == sorted(tldr.SFT_URLS.values())
    assert {k: len(v) for k, v in src.items()} == {"train": 4, "valid": 2, "test": 1}
    got = [tfds_utils.decode(src["train"][i]) for i in range(4)]
    assert got == SFT[:3] + [SFT[4]]
    assert builder.report.skipped == {"empty_response": 1, "bad_json": 1}
    # Rebuilding reuses the prepared data (no new download).
    fetched.clear()
    tfds_utils.prepare(tldr.TldrSft(data_dir=str(tmp_path)))
    assert fetched == []
    # SFT batches: prompt in Stiennon et al.'s format, summary as the loss-masked response.
    b = batching.sft_batches(src["valid"], tok, max_len=96, to_pair=tldr.sft_pair,
                             cfg=batching.LoaderConfig(batch_size=2, shuffle=False))
    batch = next(iter(b))
    resp = batching.decode_rows(tok, batch["tokens"], batch["loss_mask"])
    full = batching.decode_rows(tok, batch["tokens"], batch["mask"])
    assert resp == [" short summary 0", " short summary 1"]  # EOS decodes to nothing
    assert full[1] == ("SUBREDDIT: r/relationships\n\nTITLE: Title 1\n\nPOST: My post 1, long "
                       "story.\n\nTL;DR: short summary 1")


def test_tldr_sft_raise_mode_names_line(tmp_path, serve):
    files, _ = serve
    for s, u in tldr.SFT_URLS.items():
        files[u] = jsonl_bytes(SFT[:2] + [{k: v for k, v in SFT[2].items() if k != "post"}])
    with pytest.raises(DataError, match=r"train.jsonl:3: field 'post': missing"):
        tldr.TldrSft(data_dir=str(tmp_path), on_error="raise").download_and_prepare()


def test_tldr_comparisons(tmp_path, serve, tok):
    files, _ = serve
    for b in tldr.COMPARISON_BATCHES:
        files[tldr.COMPARISON_URLS[b]] = b""
    files[tldr.COMPARISON_URLS["batch3"]] = jsonl_bytes(
        [comparison(0, 0), comparison(1, 1), comparison(2, 0, "valid1"),
         comparison(3, 2), comparison(4, 0, summaries=[{"text": "x", "policy": "p"}])])
    files[tldr.COMPARISON_URLS["batch22"]] = jsonl_bytes([comparison(5, 1, "valid2"),
                                                          comparison(6, 1)])
    builder = tldr.TldrComparisons(data_dir=str(tmp_path))
    src = tfds_utils.prepare(builder)
    assert {k: len(v) for k, v in src.items()} == {"train": 3, "valid1": 1, "valid2": 1}
    assert builder.report.skipped == {"rank_mismatch": 2}
    ex = tfds_utils.decode(src["train"][1])
    assert ex["id"] == "t3_c1" and ex["labeler"] == "w1" and int(ex["confidence"]) == 7
    assert ex["responses"] == [" first 1", " second 1"] and ex["policies"] == ["sup2", "ref"]
    np.testing.assert_array_equal(ex["ranks"], [1, 0])  # choice 1: the second summary won
    assert ex["prompt"] == "SUBREDDIT: r/AskReddit\n\nTITLE: T1\n\nPOST: Post 1 text\n\nTL;DR:"
    assert ex["source"] == "batch3.json:2"
    p = batching.comparison_batches(src["train"], tok, max_len=64, pairs=True,
                                    cfg=batching.LoaderConfig(batch_size=3, shuffle=False))
    batch = next(iter(p))
    chosen = batching.decode_rows(tok, batch["tokens"][:, 0], batch["response_mask"][:, 0])
    assert chosen == [" first 0", " second 1", " second 6"]


def test_hh_split_prompt_rule():
    c = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant: Fine, thanks."
    r = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant: Go away."
    prompt, a, b = hh.split_prompt(c, r)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant:"
    assert (a, b) == (" Fine, thanks.", " Go away.")
    # Replies sharing their first words: the cut is still at the last shared "Assistant:".
    p2, a2, b2 = hh.split_prompt(c[:-len(" Fine, thanks.")] + " I am well.",
                                 c[:-len(" Fine, thanks.")] + " I am bad.")
    assert p2 == prompt and (a2, b2) == (" I am well.", " I am bad.")
    with pytest.raises(DataError, match="no_shared_prompt"):
        hh.split_prompt("\n\nHuman: a", "\n\nHuman: b")
    with pytest.raises(DataError, match="identical"):
        hh.split_prompt(c, c)
    with pytest.raises(DataError, match=r"field 'rejected'.*non-empty"):
        hh.split_prompt(c, r[:-len(" Go away.")] + " ")


def test_hh_builder_gz_download(tmp_path, serve, tok):
    files, fetched = serve
    dialog = "\n\nHuman: Q{i}?\n\nAssistant:"
    train = [{"chosen": dialog.format(i=i) + f" good {i}", "rejected": dialog.format(i=i) +
              f" bad {i}"} for i in range(4)]
    train.insert(2, {"chosen": "oops"})
    test = train[:1]
    for sub in hh.SUBSETS:
        for split, objs in (("train", train), ("test", test)):
            files[hh.urls(sub)[split]] = gzip.compress(jsonl_bytes(objs))
    builder = hh.HhRlhf(data_dir=str(tmp_path), config="helpful_base")
    src = tfds_utils.prepare(builder)
    assert all("helpful-base" in u for u in fetched) and len(fetched) == 2
    assert {k: len(v) for k, v in src.items()} == {"train": 4, "test": 1}
    assert builder.report.skipped == {"missing_field": 1}
    ex = tfds_utils.decode(src["train"][2])
    assert ex["prompt"] == "\n\nHuman: Q2?\n\nAssistant:"
    assert (ex["chosen"], ex["rejected"]) == (" good 2", " bad 2")
    assert ex["responses"] == [" good 2", " bad 2"] and ex["id"] == "helpful-base/train/4"
    b = batching.comparison_batches(src["train"], tok, max_len=48,
                                    cfg=batching.LoaderConfig(batch_size=4, shuffle=False))
    batch = next(iter(b))
    assert batch["tokens"].shape == (4, 2, 48)
    texts = batching.decode_rows(tok, batch["tokens"][3], batch["mask"][3])
    assert texts == [train[4]["chosen"], train[4]["rejected"]]
    # "all" unions the four subsets.
    everything = tfds_utils.prepare(hh.HhRlhf(data_dir=str(tmp_path), config="all"))
    assert len(everything["train"]) == 16
    assert tfds.core.Version("1.0.0") == builder.version
