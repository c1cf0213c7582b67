"""The labeling database: leases and their expiry, labels per item, idempotency, undo, resume."""
import json
import random
import sqlite3

from labeling_helpers import write_source
import pytest

from rlhf_jax.data import comparisons
from rlhf_jax.labeling.records import load_sources
from rlhf_jax.labeling.store import (check_ranks, Conflict, InvalidRanking, LabelStore, NotFound,
                                     to_display_order, to_record_order)


def open_store(tmp_path, source, clock, **kw):
    store = LabelStore(tmp_path / "labels.sqlite", clock=clock, **kw)
    load_sources(store, source[0])
    return store


def rank_current(store, who, sid=None, ranks=None):
    """Ranks the labeler's current item (display order 0, 1, 2, ...); returns its key."""
    view = store.state(who)["item"]
    assert view is not None, f"{who} has no item"
    ranks = ranks if ranks is not None else list(range(view["k"]))
    store.submit(who, view["item"], ranks, sid or f"sid-{who}-{view['item']}")
    return view["item"]


def test_database_is_wal_with_full_sync(tmp_path, source, clock):
    with open_store(tmp_path, source, clock) as store:
        assert store.pragma("journal_mode") == "wal"
        assert store.pragma("synchronous") == 2  # FULL


def test_lease_reserves_an_item_until_it_expires(tmp_path, source, clock):
    store = open_store(tmp_path, source, clock, labels_per_item=1, lease_seconds=60)
    a = store.state("ann")["item"]["item"]
    b = store.state("bob")["item"]["item"]
    assert a != b  # ann's item is reserved
    assert store.state("ann")["item"]["item"] == a  # asking again renews the same lease
    clock.advance(61)
    assert store.state("cid")["item"]["item"] == a  # expired: the item goes to someone else
    with pytest.raises(Conflict, match="lease expired and the item went to another labeler"):
        store.submit("ann", a, [0, 1, 2], "late-ann-1")
    assert store.state("ann")["item"]["item"] == b  # bob's lease expired too: nobody holds b
    rank_current(store, "cid")
    assert store.label_counts_per_item()[("train", "train-0")] == 1


def test_expired_lease_is_honoured_when_nobody_took_the_item(tmp_path, source, clock):
    store = open_store(tmp_path, source, clock, lease_seconds=60)
    view = store.state("ann")["item"]
    clock.advance(3600)  # ann went for lunch; nobody asked for work meanwhile
    assert not store.submit("ann", view["item"], [1, 0, 1], "lunch-ann-1")["duplicate"]
    assert [r.ranks for r in store.labels()] == [to_record_order(
        [1, 0, 1], store.perm(view["split"], view["id"], "ann", 3))]


def test_labels_per_item_two(tmp_path, source, clock):
    store = open_store(tmp_path, source, clock, labels_per_item=2)
    a = store.state("ann")["item"]["item"]
    assert store.state("bob")["item"]["item"] == a  # the second slot of the same item
    c = store.state("cid")["item"]["item"]
    assert c != a  # both slots of `a` are leased
    rank_current(store, "ann")
    rank_current(store, "bob")
    assert store.state("dan")["item"]["item"] == c  # `a` is full; `c` has a free slot
    counts = store.label_counts_per_item()
    assert max(counts.values()) == 2 and sum(counts.values()) == 2


def test_random_interleavings_never_exceed_labels_per_item(tmp_path, clock):
    """Six labelers act in random order with random clock jumps; at every step, for every item,
    rankings + unexpired leases <= labels_per_item; in the end every item has exactly that."""
    recs = write_source(tmp_path / "src", n_train=12, n_eval=3, k=3)
    store = LabelStore(tmp_path / "db.sqlite", labels_per_item=2, lease_seconds=30, clock=clock)
    load_sources(store, tmp_path / "src")
    rng = random.Random(0)
    names = [f"l{i}" for i in range(6)]
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    for step in range(600):
        who = rng.choice(names)
        op = rng.random()
        try:
            if op < 0.45:
                view = store.state(who)["item"]
                if view is not None:
                    store.submit(who, view["item"], [0, 0, 1], f"s{step:08d}")
            elif op < 0.75:
                store.state(who)
            elif op < 0.8:
                last = store.state(who)["last"]
                if last is not None:
                    store.undo(who, last["submission_id"])
            else:
                clock.advance(rng.choice([1, 10, 31]))
        except Conflict:
            pass
        rows = conn.execute(
            "SELECT i.pk, (SELECT COUNT(*) FROM labels l WHERE l.item = i.pk), (SELECT COUNT(*) "
            "FROM leases le WHERE le.item = i.pk AND le.expires_at > ?) FROM items i",
            (clock(),)).fetchall()
        for pk, n_labels, n_leases in rows:
            assert n_labels + n_leases <= 2, (step, pk, n_labels, n_leases)
    for _ in range(200):  # drain: everybody ranks until nothing is left
        busy = False
        for who in names:
            view = store.state(who)["item"]
            if view is not None:
                busy = True
                store.submit(who, view["item"], [0, 1, 2], f"d{who}{view['item']}")
        if not busy:
            break
    counts = store.label_counts_per_item()
    assert len(counts) == len(recs["train"]) + len(recs["eval"])
    assert set(counts.values()) == {2}
    dup = conn.execute("SELECT item, labeler, COUNT(*) FROM labels GROUP BY item, labeler "
                       "HAVING COUNT(*) > 1").fetchall()
    assert dup == []


def test_submission_is_idempotent(tmp_path, source, clock):
    store = open_store(tmp_path, source, clock)
    view = store.state("ann")["item"]
    first = store.submit("ann", view["item"], [2, 0, 1], "retry-me-1")
    again = store.submit("ann", view["item"], [2, 0, 1], "retry-me-1")  # lost answer, retried
    assert not first["duplicate"] and again["duplicate"]
    assert len(store.labels()) == 1
    with pytest.raises(Conflict, match="already ranked"):
        store.submit("ann", view["item"], [0, 1, 2], "another-id-2")
    nxt = store.state("ann")["item"]["item"]
    with pytest.raises(Conflict, match="already used for another ranking"):
        store.submit("ann", nxt, [0, 1, 2], "retry-me-1")
    with pytest.raises(Conflict, match="already used for another ranking"):
        store.submit("bob", view["item"], [0, 1, 2], "retry-me-1")
    assert len(store.labels()) == 1


def test_everything_resumes_after_reopening(tmp_path, source, clock):
    store = open_store(tmp_path, source, clock, labels_per_item=2)
    rank_current(store, "ann")
    rank_current(store, "ann")
    shown = store.state("ann")["item"]
    bob = store.state("bob")["item"]
    store.close()  # the server stops (or dies: every write was committed)
    store = open_store(tmp_path, source, clock, labels_per_item=2)
    st = store.state("ann")
    assert st["item"]["item"] == shown["item"]
    assert st["item"]["responses"] == shown["responses"]  # the same shuffle
    assert st["progress"]["mine"] == 2 and st["progress"]["rankings"] == 2
    assert store.state("bob")["item"]["item"] == bob["item"]
    assert store.splits() == {"train": 8, "eval": 2}  # sources were not added twice


def test_shuffle_is_per_labeler_and_hides_policies(tmp_path, clock):
    write_source(tmp_path / "src", n_train=20, n_eval=0, k=4)
    store = LabelStore(tmp_path / "db.sqlite", labels_per_item=2, clock=clock)
    load_sources(store, tmp_path / "src")
    orders = {"ann": [], "bob": []}
    for _ in range(20):
        for who in orders:
            view = store.state(who)["item"]
            assert "policies" not in view and "gold_scores" not in view
            orders[who].append(view["responses"])
            store.submit(who, view["item"], [0, 1, 2, 3], f"{who}-{view['item']:04d}")
    assert orders["ann"] != orders["bob"]  # same items, different orders
    # Display-order ranks [0, 1, 2, 3] were stored in the record's order: the response shown
    # first has rank 0 in the export.
    rows = {(r.rid, r.labeler): r for r in store.labels()}
    for who in orders:
        for shown in orders[who]:
            rid = "train-" + shown[0].split(":")[0].split()[1]
            rec = rows[(rid, who)]
            assert [rec.record["responses"][i] for i in sorted(
                range(4), key=lambda i: rec.ranks[i])] == shown


def test_skip(tmp_path, source, clock):
    store = open_store(tmp_path, source, clock)
    a = store.state("ann")["item"]["item"]
    assert not store.skip("ann", a)["duplicate"]
    assert store.skip("ann", a)["duplicate"]  # a retried skip is harmless
    b = store.state("ann")["item"]["item"]
    assert b != a
    assert store.state("bob")["item"]["item"] == a  # free for others
    with pytest.raises(Conflict, match="not your current item"):
        store.skip("ann", store.state("cid")["item"]["item"])
    for _ in range(20):
        view = store.state("ann")["item"]
        if view is None:
            break
        assert view["item"] != a  # never again for ann
        store.submit("ann", view["item"], [0, 1, 2], f"ann-{view['item']:04d}")
    assert store.state("ann")["progress"]["my_skips"] == 1


def test_undo(tmp_path, source, clock):
    store = open_store(tmp_path, source, clock)
    first = store.state("ann")["item"]
    store.submit("ann", first["item"], [1, 0, 2], "first-ranking")
    second = store.state("ann")["item"]
    store.submit("ann", second["item"], [0, 0, 1], "second-ranking")
    third = store.state("ann")["item"]["item"]
    with pytest.raises(Conflict, match="most recent"):
        store.undo("ann", "first-ranking")
    with pytest.raises(NotFound):
        store.undo("bob", "second-ranking")  # not bob's
    out = store.undo("ann", "second-ranking")
    assert out["item"] == second["item"] and out["ranks"] == [0, 0, 1]
    st = store.state("ann")
    assert st["item"]["item"] == second["item"] and st["item"]["draft"] == [0, 0, 1]
    assert st["last"]["submission_id"] == "first-ranking"
    assert st["progress"]["mine"] == 1
    assert store.state("bob")["item"]["item"] == third  # ann's lease on it was released
    with pytest.raises(NotFound, match="already undone"):
        store.undo("ann", "second-ranking")
    store.submit("ann", second["item"], [2, 1, 0], "second-again")
    ranks = {r.submission_id: r for r in store.labels()}
    assert set(ranks) == {"first-ranking", "second-again"}


@pytest.mark.parametrize("ranks, message", [
    ([0, 1], "expected 3 ranks"),
    ([0, 1, 3], r"ranks\[2\]: expected a rank in \[0, 3\)"),
    ([0, -1, 1], r"ranks\[1\]: expected a rank"),
    ([0, True, 1], r"ranks\[1\]: expected an integer"),
    ([0, 1.0, 2], r"ranks\[1\]: expected an integer"),
    ([0, 2, 2], "skip rank 1"),
    ([1, 1, 1], "skip rank 0"),
    ("012", "expected a list"),
])
def test_invalid_rankings(ranks, message):
    with pytest.raises(InvalidRanking, match=message):
        check_ranks(ranks, 3)


def test_valid_rankings_with_ties():
    for ranks in ([0, 1, 2], [2, 1, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0]):
        assert check_ranks(ranks, 3) == ranks


def test_submit_validates_against_the_item(tmp_path, source, clock):
    store = open_store(tmp_path, source, clock)
    view = store.state("ann")["item"]
    with pytest.raises(InvalidRanking, match="expected 3 ranks"):
        store.submit("ann", view["item"], [0, 1, 2, 3], "too-long-1")
    with pytest.raises(NotFound):
        store.submit("ann", 999, [0, 1, 2], "no-such-item")
    other = store.state("bob")["item"]["item"]
    with pytest.raises(Conflict, match="not leased to you"):
        store.submit("ann", other, [0, 1, 2], "not-mine-1")
    assert store.labels() == []


def test_record_order_conversion_roundtrip():
    perm = [2, 0, 3, 1]
    display = [0, 2, 1, 0]
    rec = to_record_order(display, perm)
    assert rec == [2, 0, 0, 1]  # response 2 was shown first and is best, ...
    assert to_display_order(rec, perm) == display


def test_changed_source_is_refused(tmp_path, source, clock):
    store = open_store(tmp_path, source, clock)
    rows = [json.loads(x) for x in open(source[0] / "train.jsonl")]
    rows[3]["responses"][0] = "a different response"
    with open(source[0] / "train.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="'train-3'.*differs from the one stored"):
        load_sources(store, source[0])


def test_bad_source_record_names_file_and_line(tmp_path, clock):
    write_source(tmp_path / "src", n_train=3, n_eval=1)
    with open(tmp_path / "src" / "train.jsonl", "a") as f:
        f.write(json.dumps({"id": "x", "prompt": "p", "responses": ["a", 7, "c"], "ranks": None,
                            "labeler": "", "policies": ["p", "q", "r"]}) + "\n")
    store = LabelStore(tmp_path / "db.sqlite", clock=clock)
    with pytest.raises(comparisons.DataError, match=r"train.jsonl:4: field 'responses\[1\]'"):
        load_sources(store, tmp_path / "src")


def test_collect_workdir_and_queue_interleaving(tmp_path, clock):
    write_source(tmp_path / "collect" / "to_label", n_train=8, n_eval=2)
    store = LabelStore(tmp_path / "db.sqlite", clock=clock)
    info = load_sources(store, tmp_path / "collect")  # a collect workdir: uses to_label/
    assert info["added"] == 10 and info["splits"] == {"eval": 2, "train": 8}
    seen = []
    for i in range(5):
        view = store.state(f"l{i}")["item"]
        seen.append(view["split"])
    assert seen.count("eval") == 1  # half way through the queue, half way through each split
