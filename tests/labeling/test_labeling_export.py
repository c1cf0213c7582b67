"""Export: the comparisons schema, read back by rlhf_jax.data.comparisons."""
import json

from labeling_helpers import write_source

from rlhf_jax.data import comparisons
from rlhf_jax.labeling.__main__ import main
from rlhf_jax.labeling.records import export_rankings, load_sources
from rlhf_jax.labeling.store import LabelStore


def label_all(store, names, ranks_of):
    """Every labeler ranks until nothing is left; ``ranks_of(view)`` gives display ranks."""
    for _ in range(1000):
        busy = False
        for who in names:
            view = store.state(who)["item"]
            if view is not None:
                busy = True
                store.submit(who, view["item"], ranks_of(view), f"{who}-{view['item']:06d}")
        if not busy:
            return


def best_last(view):
    """Display ranks that put the response with the highest gold (the last one written, whose
    text has the most 'lorem ipsum') first, and the one with the lowest gold last."""
    order = sorted(range(view["k"]), key=lambda d: -len(view["responses"][d]))
    ranks = [0] * view["k"]
    for r, d in enumerate(order):
        ranks[d] = r
    return ranks


def test_export_round_trip_single_labeler(tmp_path):
    recs = write_source(tmp_path / "src", n_train=6, n_eval=2, k=3)
    db = tmp_path / "src" / "labels.sqlite"
    with LabelStore(db) as store:
        load_sources(store, tmp_path / "src")
        label_all(store, ["ann"], best_last)
    counts = export_rankings(db, tmp_path / "out")
    assert counts == {"train": 6, "eval": 2}
    for split in ("train", "eval"):
        back = comparisons.read_comparisons(tmp_path / "out" / f"{split}.jsonl")
        imported = comparisons.import_rankings(tmp_path / "out" / f"{split}.jsonl")
        assert back == imported
        src = {r["id"]: r for r in recs[split]}
        assert sorted(r["id"] for r in back) == sorted(src)  # one labeler: ids unchanged
        for r in back:
            s = src[r["id"]]
            assert r["labeler"] == "ann"
            assert r["prompt"] == s["prompt"] and r["responses"] == s["responses"]
            assert r["policies"] == s["policies"] and r["gold_scores"] == s["gold_scores"]
            assert r["ranks"] == [2, 1, 0]  # in the record's order, whatever the shuffle was


def test_export_several_labelers_get_distinct_ids(tmp_path):
    recs = write_source(tmp_path / "src", n_train=4, n_eval=1, k=4)
    db = tmp_path / "db.sqlite"
    with LabelStore(db, labels_per_item=2) as store:
        load_sources(store, tmp_path / "src")
        label_all(store, ["ann", "bob", "cid"], lambda v: [0, 0, 1, 2])
        n_labels = len(store.labels())
    assert n_labels == 2 * 5
    export_rankings(db, tmp_path / "out")
    train = comparisons.read_comparisons(tmp_path / "out" / "train.jsonl")
    assert len(train) == 8
    ids = [r["id"] for r in train]
    assert len(set(ids)) == 8
    for r in train:
        base, who = r["id"].split("#")
        assert who == r["labeler"] and who in ("ann", "bob", "cid")
        assert base in {s["id"] for s in recs["train"]}
        assert sorted(r["ranks"]) == [0, 0, 1, 2]
    per_item = {}
    for r in train:
        per_item.setdefault(r["id"].split("#")[0], set()).add(r["labeler"])
    assert all(len(v) == 2 for v in per_item.values())


def test_export_leaves_out_empty_splits_with_a_warning(tmp_path, capsys):
    write_source(tmp_path / "src", n_train=6, n_eval=1, k=3)
    db = tmp_path / "db.sqlite"
    with LabelStore(db) as store:
        load_sources(store, tmp_path / "src")
        for _ in range(2):  # the first two items of the queue are train items
            view = store.state("ann")["item"]
            assert view["split"] == "train"
            store.submit("ann", view["item"], [0, 1, 2], f"ann-{view['item']:06d}")
    counts = export_rankings(db, tmp_path / "out")
    assert counts == {"train": 2, "eval": 0}
    assert not (tmp_path / "out" / "eval.jsonl").exists()
    assert "split 'eval' has no rankings yet" in capsys.readouterr().err
    assert len(comparisons.read_comparisons(tmp_path / "out" / "train.jsonl")) == 2


def test_export_command_finds_the_database_of_a_collect_workdir(tmp_path, capsys):
    write_source(tmp_path / "collect" / "to_label", n_train=2, n_eval=1, k=3)
    db = tmp_path / "collect" / "to_label" / "labels.sqlite"  # where `serve <workdir>` puts it
    with LabelStore(db) as store:
        load_sources(store, tmp_path / "collect")
        label_all(store, ["ann"], lambda v: [1, 0, 1])
    assert main(["export", str(tmp_path / "collect"), "--out", str(tmp_path / "ranked")]) == 0
    assert "--labeler import --rankings-file" in capsys.readouterr().err
    rows = [json.loads(x) for x in open(tmp_path / "ranked" / "train.jsonl")]
    assert len(rows) == 2 and all(sorted(r["ranks"]) == [0, 1, 1] for r in rows)
    assert main(["agreement", str(db)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labelers"][0]["labeler"] == "ann" and report["labelers"][0]["rankings"] == 3
    assert main(["export", str(tmp_path / "nothing-here.sqlite"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "no labeling database" in capsys.readouterr().err
