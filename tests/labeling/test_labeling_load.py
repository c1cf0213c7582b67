"""Load: concurrent simulated labelers over HTTP while the server is SIGKILLed and restarted.

Each labeler is a thread with its own HTTP client (:func:`rlhf_jax.labeling.client.simulate`):
it takes an item, ranks it from gold scores with Bradley–Terry noise, submits, and retries a
submission that got no answer with the same ``submission_id``. A killer thread SIGKILLs the
server process (``python -m rlhf_jax.labeling serve``) after given numbers of acknowledged
rankings and starts it again on the same port and database. Afterwards the database must hold
every acknowledged ranking exactly as sent, nothing twice, nothing unacknowledged, and every item
exactly ``labels_per_item`` times. The p95 latency of an acknowledged submission (including the
waits of those that straddled a restart) is printed, not asserted.
"""
import threading
import time

from labeling_helpers import ProcessServer, write_source
import numpy as np
import pytest

from rlhf_jax.labeling.client import GoldLookup, LabelingClient, simulate
from rlhf_jax.labeling.store import LabelStore, to_record_order


def run_load(tmp_path, *, n_items, labels_per_item, n_labelers, kill_after, k=3):
    recs = write_source(tmp_path / "src", n_train=n_items - n_items // 10,
                        n_eval=n_items // 10, k=k)
    db = tmp_path / "labels.sqlite"
    srv = ProcessServer([tmp_path / "src", "--db", db, "--labels-per-item", labels_per_item],
                        log_path=tmp_path / "server.log")
    gold = GoldLookup.from_records(recs)
    target = n_items * labels_per_item
    acked = [0]
    lock = threading.Lock()
    results, errors = {}, []

    def count(_answer):
        with lock:
            acked[0] += 1

    def labeler(i):
        name = f"sim{i:02d}"
        try:
            with LabelingClient(srv.url, labeler=name, timeout=10, retry_seconds=90) as client:
                results[name] = simulate(client, gold, labeler=name, temperature=0.5, seed=i,
                                         on_submit=count)
        except BaseException as e:  # reported below; the thread must not die silently
            errors.append(f"{name}: {e!r}")

    kills = []

    def killer():
        for threshold in kill_after:
            deadline = time.monotonic() + 240
            while acked[0] < threshold and time.monotonic() < deadline and not errors:
                time.sleep(0.005)
            if acked[0] < threshold:
                return
            srv.kill()
            kills.append(acked[0])
            srv.start()

    srv.start()
    t0 = time.perf_counter()
    try:
        threads = [threading.Thread(target=labeler, args=(i,), daemon=True)
                   for i in range(n_labelers)]
        kt = threading.Thread(target=killer, daemon=True)
        for t in threads + [kt]:
            t.start()
        for t in threads + [kt]:
            t.join(timeout=300)
        wall = time.perf_counter() - t0
        assert not any(t.is_alive() for t in threads + [kt]), "a labeler or the killer hung"
        assert not errors, errors
    finally:
        srv.stop()
    assert len(kills) == len(kill_after), f"killed at {kills}, wanted {kill_after}"
    assert srv.starts == 1 + len(kill_after)

    with LabelStore(db, create=False) as store:
        rows = store.labels()
        counts = store.label_counts_per_item()
        by_sid = {r.submission_id: r for r in rows}
        submitted = [(name, sid, item, ranks) for name, res in results.items()
                     for sid, item, ranks in res.submissions]
        lost = 0
        for name, sid, item, ranks in submitted:
            row = by_sid.get(sid)
            if row is None or row.labeler != name:
                lost += 1
                continue
            perm = store.perm(row.split, row.rid, name, len(ranks))
            lost += row.ranks != to_record_order(ranks, perm)  # stored, but not as sent
    pairs = [(r.split, r.rid, r.labeler) for r in rows]
    duplicated = len(pairs) - len(set(pairs)) + len(submitted) - len({s[1] for s in submitted})
    unacknowledged = len(set(by_sid) - {s[1] for s in submitted})
    lat = np.array([x for res in results.values() for x in res.latencies])
    stats = {"rankings": len(rows), "acknowledged": len(submitted), "lost": lost,
             "duplicated": duplicated, "unacknowledged_in_db": unacknowledged,
             "kills_at_acks": kills,
             "retried_requests": sum(res.retries for res in results.values()),
             "acks_answered_duplicate": sum(res.duplicates for res in results.values()),
             "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
             "p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 1),
             "max_ms": round(float(lat.max()) * 1e3, 1), "wall_s": round(wall, 1)}
    print(f"\n[labeling load] {n_labelers} labelers, {n_items} items x {labels_per_item}: {stats}")
    assert lost == 0 and duplicated == 0 and unacknowledged == 0, stats
    assert len(submitted) == len(rows) == target, stats
    assert set(counts.values()) == {labels_per_item} and len(counts) == n_items, stats
    return stats


def test_load_small_with_two_sigkills(tmp_path):
    """5 labelers, 200 rankings (100 items x 2), SIGKILL at 60 and 130 acks."""
    run_load(tmp_path, n_items=100, labels_per_item=2, n_labelers=5, kill_after=[60, 130])


@pytest.mark.slow
def test_load_2000_rankings_20_labelers_two_sigkills(tmp_path):
    """20 labelers, 2,000 rankings (1,000 items x 2), SIGKILL at 600 and 1,300 acks."""
    run_load(tmp_path, n_items=1000, labels_per_item=2, n_labelers=20, kill_after=[600, 1300])
