"""grain batching: masks against hand/NumPy oracles, padding, packing, sharding, resume."""
import json

import jax
import numpy as np
import pytest

from rlhf_jax.data import batching
from rlhf_jax.data.errors import DataError, DataReport

REVIEWS = [f"Review {i}: " + "great fun and fine acting. " * (1 + i % 4) for i in range(23)]


def _cfg(**kw):
    kw.setdefault("batch_size", 4)
    return batching.LoaderConfig(**kw)


def test_sft_tokens_and_loss_mask_match_manual_layout(tok):
    src = [{"prompt": "Question: capital of France?", "response": " Paris."},
           {"prompt": "", "response": "Just a response"}]
    b = list(batching.sft_batches(src, tok, max_len=40, cfg=_cfg(batch_size=2, shuffle=False)))
    assert len(b) == 1
    batch = b[0]
    for row, ex in enumerate(src):
        p = tok.encode(ex["prompt"]) if ex["prompt"] else []
        r = tok.encode(ex["response"]) + [tok.eos_id]
        n = len(p) + len(r)
        want = np.array(p + r + [tok.pad_id] * (40 - n), np.int32)
        np.testing.assert_array_equal(batch["tokens"][row], want)
        np.testing.assert_array_equal(batch["mask"][row], np.arange(40) < n)
        np.testing.assert_array_equal(batch["loss_mask"][row],
                                      (np.arange(40) >= len(p)) & (np.arange(40) < n))
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == bool
    assert tok.eos_id != tok.pad_id


def test_sft_overlong_rules(tok):
    long = {"prompt": "great fun " * 20, "response": " and fine acting" * 10}
    short = {"prompt": "Hi", "response": " there"}
    src = [long, short]
    b = batching.sft_batches(src, tok, max_len=16, cfg=_cfg(batch_size=1, shuffle=False))
    out = list(b)
    assert len(out) == 1 and b.report.skipped["too_long"] == 1 and b.report.kept == 1
    assert "sft#0" in b.report.summary() and "max_len 16" in b.report.summary()
    with pytest.raises(DataError, match=r"sft#0.*expected at most max_len=16"):
        list(batching.sft_batches(src, tok, max_len=16, overlong="raise",
                                  cfg=_cfg(batch_size=1, shuffle=False)))
    t = batching.sft_batches(src, tok, max_len=16, overlong="truncate",
                             cfg=_cfg(batch_size=2, shuffle=False))
    row = next(iter(t))
    assert t.report.modified["truncated"] == 1
    # Truncation keeps exactly T tokens: the last prompt token and the first response tokens.
    assert row["mask"][0].all() and row["loss_mask"][0].sum() == 15
    r = tok.encode(long["response"])
    np.testing.assert_array_equal(row["tokens"][0, 1:], r[:15])
    assert row["tokens"][0, 0] == tok.encode(long["prompt"])[-1]


def test_empty_response_is_skipped_and_counted(tok):
    src = [{"prompt": "a", "response": "  "}, {"prompt": "b", "response": "ok"}]
    b = batching.sft_batches(src, tok, max_len=16, cfg=_cfg(batch_size=1, shuffle=False))
    assert len(list(b)) == 1 and b.report.skipped == {"empty": 1}


def test_undecodable_bytes_name_the_example(tok):
    src = [{"prompt": b"ok", "response": b"fine"}, {"prompt": b"\xff\xfe", "response": b"x"}]
    with pytest.raises(DataError, match=r"sft#1: field 'prompt'.*UTF-8"):
        list(batching.sft_batches(src, tok, max_len=16, cfg=_cfg(batch_size=1, shuffle=False)))
    with pytest.raises(DataError, match=r"sft#0: field 'response': missing"):
        list(batching.sft_batches([{"prompt": "x"}], tok, max_len=8,
                                  cfg=_cfg(batch_size=1, shuffle=False)))


def test_lm_packing_equals_numpy_concatenation(tok):
    docs = [{"text": t} for t in REVIEWS[:9]] + [{"text": "   "}]
    cfg = _cfg(batch_size=2, shuffle=False, drop_remainder=False)
    b = batching.lm_batches(docs, tok, max_len=32, cfg=cfg)
    rows = [x for batch in b for x in zip(*[batch[k] for k in
                                            ("tokens", "mask", "loss_mask", "segment_ids")])]
    stream = np.concatenate([np.asarray(tok.encode(d["text"]) + [tok.eos_id])
                             for d in docs[:9]])
    got_tokens = np.concatenate([t[m] for t, m, _, _ in rows])
    np.testing.assert_array_equal(got_tokens, stream)
    assert all(len(t) == 32 for t, _, _, _ in rows)
    assert all(m[:-1].all() for _, m, _, _ in rows[:-1])  # only the very last row is padded
    last_t, last_m, last_l, last_s = rows[-1]
    assert (last_t[~last_m] == tok.pad_id).all() and (last_s[~last_m] == 0).all()
    np.testing.assert_array_equal(last_l, last_m)
    # Segment ids restart per row and step after each EOS.
    for t, m, _, s in rows:
        eos_before = np.concatenate([[0], np.cumsum(t[m] == tok.eos_id)[:-1]])
        np.testing.assert_array_equal(s[m] - s[m][0], eos_before)
    assert b.report.skipped == {"empty": 1}


def test_prompts_left_padded_and_truncated_first_or_last(tok):
    src = [{"text": REVIEWS[3]}, {"text": "Short one"}, {"text": ""}]
    for keep in ("first", "last"):
        b = batching.prompt_batches(src, tok, max_len=8, keep=keep,
                                    cfg=_cfg(batch_size=2, shuffle=False))
        batch = next(iter(b))
        ids = tok.encode(REVIEWS[3])
        want = ids[:8] if keep == "first" else ids[-8:]
        np.testing.assert_array_equal(batch["tokens"][0], want)
        short = tok.encode("Short one")
        np.testing.assert_array_equal(batch["tokens"][1, 8 - len(short):], short)
        assert (batch["tokens"][1, :8 - len(short)] == tok.pad_id).all()
        np.testing.assert_array_equal(batch["mask"][1], np.arange(8) >= 8 - len(short))
        assert list(batch["text"]) == [REVIEWS[3], "Short one"]
        np.testing.assert_array_equal(batch["index"], [0, 1])
        assert b.report.modified == {"truncated": 1} and b.report.skipped == {"empty": 1}
        assert set(batching.arrays_only(batch)) == {"tokens", "mask", "index"}


def test_comparisons_pad_k_and_pairs_chosen_first(tok):
    src = [{"prompt": "P0", "responses": ["a1", "a2", "a3"], "ranks": [2, 0, 1]},
           {"prompt": "P1", "responses": ["b1", "b2"], "ranks": [1, 0]},
           {"prompt": "P2", "responses": ["c1", "c2", "c3", "c4"], "ranks": [0, 1, 2, 3]},
           {"prompt": "P3", "responses": ["d1", "d2"], "ranks": [0, 0]}]
    b = batching.comparison_batches(src, tok, max_len=12, cfg=_cfg(batch_size=3, shuffle=False))
    batch = next(iter(b))
    assert batch["tokens"].shape == (3, 3, 12)
    np.testing.assert_array_equal(batch["ranks"], [[2, 0, 1], [1, 0, -1], [0, 0, -1]])
    np.testing.assert_array_equal(batch["valid"], [[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    assert not batch["mask"][1, 2].any() and (batch["tokens"][1, 2] == tok.pad_id).all()
    assert b.report.skipped == {"too_many_responses": 1}

    p = batching.comparison_batches(src, tok, max_len=12, pairs=True,
                                    cfg=_cfg(batch_size=1, shuffle=False))
    rows = [x for x in p]
    # Oracle: every (better, worse) pair the ranks imply, ties dropped.
    want = [(ex["prompt"], ex["responses"][a], ex["responses"][c]) for ex in src
            for a in range(len(ex["ranks"])) for c in range(len(ex["ranks"]))
            if ex["ranks"][a] < ex["ranks"][c]]
    got = []
    for x in rows:
        assert x["tokens"].shape == (1, 2, 12)
        np.testing.assert_array_equal(x["ranks"][0], [0, 1])
        prompt_chosen, prompt_rejected = batching.decode_rows(tok, x["tokens"][0], x["mask"][0])
        chosen, rejected = batching.decode_rows(tok, x["tokens"][0], x["response_mask"][0])
        got.append((prompt_chosen[:2], chosen, rejected))
        assert prompt_rejected == prompt_chosen[:2] + rejected
    assert got == want
    assert p.report.skipped == {"no_pairs": 1}


def test_shuffle_is_seeded_and_epochs_differ(tok):
    src = [{"text": r} for r in REVIEWS]

    def order(seed, epochs=2):
        b = batching.prompt_batches(src, tok, max_len=4, cfg=_cfg(seed=seed, num_epochs=epochs,
                                                                  batch_size=1))
        return [int(x["index"][0]) for x in b]

    a = order(0)
    assert a == order(0) and a != order(1)
    assert sorted(a[:23]) == list(range(23)) and sorted(a[23:]) == list(range(23))
    assert a[:23] != a[23:]


def test_sharding_by_process_gives_disjoint_equal_shards(tok, monkeypatch):
    src = [{"text": r} for r in REVIEWS]
    seen = []
    for pid in range(3):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        monkeypatch.setattr(jax, "process_count", lambda: 3)
        b = batching.prompt_batches(src, tok, max_len=4,
                                    cfg=_cfg(batch_size=1, shard_by_process=True))
        assert b.num_examples == 7
        seen.append({int(x["index"][0]) for x in b})
    assert all(len(s) == 7 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def _equal_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("kind", ["sft", "lm", "comparisons", "prompts"])
def test_resume_continues_at_the_same_example(tok, kind, tmp_path):
    cfg = _cfg(batch_size=2, seed=3, num_epochs=None)
    sft_src = [{"prompt": r[:10], "response": r[10:]} for r in REVIEWS]
    cmp_src = [{"prompt": r[:10], "responses": [r[10:], r[12:]], "ranks": [i % 2, 1 - i % 2]}
               for i, r in enumerate(REVIEWS)]
    make = {
        "sft": lambda: batching.sft_batches(sft_src, tok, max_len=64, cfg=cfg),
        "lm": lambda: batching.lm_batches([{"text": r} for r in REVIEWS], tok, max_len=24,
                                          cfg=cfg),
        "comparisons": lambda: batching.comparison_batches(cmp_src, tok, max_len=64, cfg=cfg),
        "prompts": lambda: batching.prompt_batches([{"text": r} for r in REVIEWS], tok,
                                                   max_len=8, cfg=cfg),
    }[kind]
    n, m = 13, 17  # crosses an epoch boundary (23 examples / 2 per batch)
    it = iter(make())
    for _ in range(n):
        next(it)
    state = batching.iterator_state(it)
    json.dumps(state)  # JSON-able
    want = [next(it) for _ in range(m)]

    # Through the project's orbax checkpointer (the state rides in the JSON metadata).
    from rlhf_jax.checkpoint import Checkpointer
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(n, {"w": np.zeros(2, np.float32)}, {"data": state})
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        _, meta = ckpt.restore({"w": np.zeros(2, np.float32)})
    fresh = batching.restore_iterator(iter(make()), meta["data"])
    _equal_batches([next(fresh) for _ in range(m)], want)


def test_batches_place_on_the_mesh(tok, mesh8):
    from rlhf_jax import parallel
    b = batching.prompt_batches([{"text": r} for r in REVIEWS], tok, max_len=8,
                                cfg=_cfg(batch_size=8))
    batch = batching.arrays_only(next(iter(b)))
    placed = parallel.shard_batch(batch, mesh8)
    np.testing.assert_array_equal(np.asarray(placed["tokens"]), batch["tokens"])
    assert placed["tokens"].sharding.spec[0] == (parallel.DATA, parallel.FSDP)  # batch axes


def test_report_deduplicates_across_epochs(tok):
    src = [{"text": "   "}, {"text": "fine"}, {"text": "also fine"}]
    b = batching.prompt_batches(src, tok, max_len=4, cfg=_cfg(batch_size=1, num_epochs=3))
    assert len(list(b)) == 6
    assert b.report.skipped == {"empty": 1} and b.report.kept == 2
    assert b.report.summary().startswith("[prompts] kept 2, skipped 1")
    r = DataReport()
    r.skip("x", "m", key=1)
    r.skip("x", "m", key=1)
    r.skip("x", "m")
    r.skip("x", "m")
    assert r.skipped["x"] == 3


def test_resumed_loader_reports_the_whole_run(tok, tmp_path):
    """The report rides in the checkpoint with the iterator's position: a run resumed after a
    checkpoint reports every example it read (before: only those read since the resume)."""
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.loop import StatefulBatches
    src = [{"prompt": r[:10], "response": "" if i % 5 == 0 else r[10:]}
           for i, r in enumerate(REVIEWS)]  # 5 empty responses: skipped and counted

    def make():
        return StatefulBatches(batching.sft_batches(src, tok, max_len=64, cfg=_cfg(
            batch_size=2, seed=1, num_epochs=None, prefetch=0)))

    whole = make()
    for _ in range(9):  # the first epoch: 18 kept examples, 9 batches
        whole.next()
    first = make()
    for _ in range(4):
        first.next()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(4, {"w": np.zeros(2, np.float32)}, {"data": first.get_state()})
    assert 0 < first.batches.report.kept < 18  # the checkpoint is inside the first epoch
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        _, meta = ckpt.restore({"w": np.zeros(2, np.float32)})
    resumed = make()
    resumed.set_state(meta["data"])
    for _ in range(5):
        resumed.next()
    want, got = whole.batches.report, resumed.batches.report
    assert (want.kept, want.skipped) == (18, {"empty": 5})
    assert (got.kept, got.skipped, got.examples) == (want.kept, want.skipped, want.examples)
    assert got.summary() == want.summary()


def test_report_state_round_trips_any_keys():
    r = DataReport(name="x")
    for key in (0, 7, 1000):
        r.keep(key=key)
    r.skip("empty", "e.jsonl:3: empty", key="e.jsonl:3")
    r.modify("truncated", "t", key=5)
    back = DataReport(name="x")
    back.set_state(json.loads(json.dumps(r.get_state())))
    assert (back.kept, back.skipped, back.modified) == (3, {"empty": 1}, {"truncated": 1})
    for key in (0, 7, 1000):  # already seen: not counted again
        back.keep(key=key)
    back.skip("empty", "again", key="e.jsonl:3")
    back.modify("truncated", "again", key=5)
    assert (back.kept, back.num_skipped, sum(back.modified.values())) == (3, 1, 1)
    back.keep(key=8)
    assert back.kept == 4
