"""The labeling database: items, leases, rankings and skips in one SQLite file (WAL mode).

Tables (``LabelStore`` creates them; one file per labeling session)::

    meta    (key, value)                      schema version, the secret behind the shuffles
    items   (pk, split, rid, k, queue_pos, record)    one per prompt; ``record`` is its JSON
    leases  (labeler PK, item, expires_at, draft)     the item a labeler is looking at (<= 1 each)
    labels  (seq, item, labeler, ranks, submission_id UNIQUE, created_at, UNIQUE(item, labeler))
    skips   (item, labeler, created_at)              items a labeler chose not to rank

Guarantees:

* **Durability.** ``journal_mode=WAL`` and ``synchronous=FULL``: every write is one transaction,
  committed (the WAL fsynced) before the method returns, so a ranking the server acknowledged
  survives a SIGKILL of the server and a power cut.
* **At most ``labels_per_item`` rankings per item.** An item is leased to a labeler only while
  ``rankings + unexpired leases of other labelers < labels_per_item``; a ranking needs the
  labeler's lease. A lease that expired still counts when nobody else has taken its place (the
  labeler who walked away for a while can submit), otherwise the submission is refused (409).
  All of this runs in ``BEGIN IMMEDIATE`` transactions, so concurrent labelers (threads, or
  several processes on one file) are serialised and the bound holds.
* **Idempotent submissions.** Each submission carries a client-chosen ``submission_id``; a retry
  with the same id (after a lost response) answers ``duplicate=True`` and writes nothing. A
  labeler ranks an item at most once (``UNIQUE(item, labeler)``).
* **Resume.** Leases, rankings and skips live in the file: after a restart every labeler gets
  back the item they were looking at, shuffled the same way.
* **Blind, stable shuffles.** A labeler sees the K responses in an order drawn from
  ``sha256(secret, split, id, labeler)``; the secret is random per database and never leaves the
  server, so the order reveals nothing about which policy wrote which response, and a reload
  shows the same order. Rankings travel in display order and are stored in the record's order.

Ranks are "dense": ``ranks[i]`` is the rank of response ``i`` (0 = best, equal = tie), and the
distinct values are exactly ``0, 1, ..., m-1``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import re
import secrets
import sqlite3
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

SCHEMA_VERSION = "1"
LABELER_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
SUBMISSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
DEFAULT_DB_NAME = "labels.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
  pk INTEGER PRIMARY KEY,
  split TEXT NOT NULL,
  rid TEXT NOT NULL,
  k INTEGER NOT NULL,
  queue_pos REAL NOT NULL,
  record TEXT NOT NULL,
  UNIQUE (split, rid));
CREATE INDEX IF NOT EXISTS items_by_queue ON items (queue_pos, pk);
CREATE TABLE IF NOT EXISTS leases (
  labeler TEXT PRIMARY KEY,
  item INTEGER NOT NULL REFERENCES items (pk),
  expires_at REAL NOT NULL,
  draft TEXT);
CREATE INDEX IF NOT EXISTS leases_by_item ON leases (item, expires_at);
CREATE TABLE IF NOT EXISTS labels (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  item INTEGER NOT NULL REFERENCES items (pk),
  labeler TEXT NOT NULL,
  ranks TEXT NOT NULL,
  submission_id TEXT NOT NULL UNIQUE,
  created_at REAL NOT NULL,
  UNIQUE (item, labeler));
CREATE INDEX IF NOT EXISTS labels_by_labeler ON labels (labeler, seq);
CREATE TABLE IF NOT EXISTS skips (
  item INTEGER NOT NULL REFERENCES items (pk),
  labeler TEXT NOT NULL,
  created_at REAL NOT NULL,
  PRIMARY KEY (item, labeler));
"""


class LabelingError(Exception):
    """A request the store refuses; ``status`` is the HTTP status the server answers with."""
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(LabelingError):
    status = 404


class Conflict(LabelingError):
    """The request does not fit the current state (no lease, already ranked, nothing to undo)."""
    status = 409


class InvalidRanking(LabelingError):
    status = 422


@dataclasses.dataclass(frozen=True)
class LabelRow:
    """One stored ranking, in the record's response order (not the labeler's display order)."""
    seq: int
    split: str
    rid: str
    labeler: str
    ranks: list[int]
    submission_id: str
    created_at: float
    record: dict


def check_labeler(name: Any) -> str:
    """Returns ``name`` if it is a valid labeler name, else raises :class:`LabelingError`."""
    if not isinstance(name, str) or not LABELER_RE.fullmatch(name):
        raise LabelingError(f"labeler name: expected 1-64 characters from A-Z a-z 0-9 _ . @ -, "
                            f"got {str(name)[:80]!r}")
    return name


def check_ranks(ranks: Any, k: int, where: str = "ranks") -> list[int]:
    """Validates a ranking of ``k`` responses (dense ranks, ties allowed); returns it as a list.

    Raises:
      InvalidRanking: naming the offending position and what was expected.
    """
    if not isinstance(ranks, (list, tuple)):
        raise InvalidRanking(f"{where}: expected a list of {k} integers, got "
                             f"{type(ranks).__name__}")
    if len(ranks) != k:
        raise InvalidRanking(f"{where}: expected {k} ranks (one per response), got {len(ranks)}")
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int):
            raise InvalidRanking(f"{where}[{i}]: expected an integer, got {r!r}")
        if not 0 <= r < k:
            raise InvalidRanking(f"{where}[{i}]: expected a rank in [0, {k}) (0 = best), got {r}")
    used = sorted(set(ranks))
    if used != list(range(len(used))):
        missing = min(set(range(len(used))) - set(used))
        raise InvalidRanking(f"{where}: ranks {list(ranks)} skip rank {missing}; expected dense "
                             f"ranks (the distinct values are 0..m-1, tied responses share one)")
    return [int(r) for r in ranks]


def display_order(secret: str, split: str, rid: str, labeler: str, k: int) -> list[int]:
    """``perm[d]`` = index (in the record) of the response shown at position ``d``.

    Deterministic in its arguments; unpredictable without ``secret``.
    """
    digest = hashlib.sha256("\0".join((secret, split, rid, labeler)).encode("utf-8")).digest()
    perm = list(range(k))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(perm)
    return perm


def to_record_order(display_ranks: Sequence[int], perm: Sequence[int]) -> list[int]:
    """Ranks in display order -> ranks in the record's order (``out[perm[d]] = ranks[d]``)."""
    out = [0] * len(perm)
    for d, i in enumerate(perm):
        out[i] = int(display_ranks[d])
    return out


def to_display_order(record_ranks: Sequence[int], perm: Sequence[int]) -> list[int]:
    """The inverse of :func:`to_record_order`."""
    return [int(record_ranks[i]) for i in perm]


def _content(record: Mapping) -> dict:
    """The part of a record that must not change while it is being labeled."""
    return {k: record.get(k) for k in ("prompt", "responses", "policies")}


class LabelStore:
    """A labeling session stored in one SQLite file (see the module docstring).

    Thread-safe: one connection, guarded by a lock (SQLite serialises writers anyway). Several
    processes may open the same file; writes are serialised by ``BEGIN IMMEDIATE``.

    Args:
      path: the database file (created with its parent folder if missing).
      labels_per_item: how many labelers rank each item (>= 1).
      lease_seconds: how long an item stays reserved for the labeler it was shown to.
      clock: seconds since the epoch (``time.time``); tests pass a fake clock.
      create: False raises ``FileNotFoundError`` when ``path`` does not exist (export, reports).
    """

    def __init__(self, path: str | os.PathLike, *, labels_per_item: int = 1,
                 lease_seconds: float = 600.0, clock: Callable[[], float] = time.time,
                 create: bool = True):
        if int(labels_per_item) < 1:
            raise ValueError(f"labels_per_item must be >= 1, got {labels_per_item}")
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.path = pathlib.Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no labeling database at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.labels_per_item = int(labels_per_item)
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), isolation_level=None,
                                     check_same_thread=False, timeout=60.0)
        self._conn.row_factory = sqlite3.Row
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); put the "
                               f"database on a local file system")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=60000")
        with self._lock:  # idempotent statements; executescript runs outside transactions
            self._conn.executescript(_SCHEMA)
        with self._tx() as c:
            version = self._meta(c, "schema_version")
            if version is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
                c.execute("INSERT INTO meta VALUES ('secret', ?)", (secrets.token_hex(16),))
            elif version != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: labeling schema version {version}, this code "
                                   f"reads version {SCHEMA_VERSION}")
            self._secret = self._meta(c, "secret")

    # ------------------------------------------------------------------------------------------
    # Plumbing.

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT (the commit is durable on return)."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    @staticmethod
    def _meta(c: sqlite3.Connection, key: str) -> str | None:
        row = c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "LabelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pragma(self, name: str) -> Any:
        """The value of ``PRAGMA name`` (e.g. ``journal_mode``, ``synchronous``)."""
        with self._lock:
            return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    # ------------------------------------------------------------------------------------------
    # Items.

    def add_records(self, splits: Mapping[str, Sequence[Mapping]],
                    where: Mapping[str, str] | None = None) -> tuple[int, int]:
        """Adds validated comparison records (``ranks``/``labeler`` ignored) as items.

        Args:
          splits: ``{split: records}``, e.g. ``{"train": [...], "eval": [...]}``.
          where: ``{split: source file}`` for error messages.

        Records already in the database (same split and id) are kept as they are; one whose
        prompt, responses or policies changed raises ``ValueError`` (a database labels one fixed
        set of responses). The new items of all splits are interleaved in the queue by their
        relative position within their split, so a session stopped early covers every split.

        Returns:
          ``(added, already_present)``.
        """
        where = dict(where or {})
        added = present = 0
        with self._tx() as c:
            top = c.execute("SELECT MAX(queue_pos) FROM items").fetchone()[0]
            base = 0.0 if top is None else float(int(top) + 1)
            for split, records in splits.items():
                src = where.get(split, "<records>")
                if not re.fullmatch(r"[A-Za-z0-9_]+", split):
                    raise ValueError(f"{src}: split name {split!r} is not [A-Za-z0-9_]+")
                fresh = []
                for i, rec in enumerate(records):
                    row = c.execute("SELECT record FROM items WHERE split = ? AND rid = ?",
                                    (split, rec["id"])).fetchone()
                    if row is None:
                        fresh.append(rec)
                        continue
                    if _content(json.loads(row[0])) != _content(rec):
                        raise ValueError(
                            f"{src}: item {rec['id']!r} (split {split!r}, record #{i}) differs "
                            f"from the one stored in {self.path}; label the new file with "
                            f"another --db, or restore the old file")
                    present += 1
                for j, rec in enumerate(fresh):
                    stored = {k: v for k, v in rec.items()
                              if k not in ("ranks", "labeler", "_where")}
                    c.execute("INSERT INTO items (split, rid, k, queue_pos, record) "
                              "VALUES (?, ?, ?, ?, ?)",
                              (split, rec["id"], len(rec["responses"]),
                               base + (j + 0.5) / len(fresh),
                               json.dumps(stored, ensure_ascii=False)))
                    added += 1
        return added, present

    def splits(self) -> dict[str, int]:
        """``{split: number of items}`` in queue order of first appearance."""
        with self._lock:
            rows = self._conn.execute("SELECT split, COUNT(*) FROM items GROUP BY split "
                                      "ORDER BY MIN(queue_pos)").fetchall()
        return {r[0]: r[1] for r in rows}

    def _item(self, c: sqlite3.Connection, pk: int) -> sqlite3.Row:
        row = c.execute("SELECT pk, split, rid, k, record FROM items WHERE pk = ?",
                        (pk,)).fetchone()
        if row is None:
            raise NotFound(f"item {pk}: no such item")
        return row

    def perm(self, split: str, rid: str, labeler: str, k: int) -> list[int]:
        """The display order of an item for a labeler (see :func:`display_order`)."""
        return display_order(self._secret, split, rid, labeler, k)

    # ------------------------------------------------------------------------------------------
    # Leases.

    def _room(self, c: sqlite3.Connection, item: int, labeler: str, now: float) -> int:
        """Free slots of ``item`` for ``labeler``: L - rankings - live leases of others."""
        n_labels = c.execute("SELECT COUNT(*) FROM labels WHERE item = ?", (item,)).fetchone()[0]
        n_leases = c.execute("SELECT COUNT(*) FROM leases WHERE item = ? AND expires_at > ? "
                             "AND labeler != ?", (item, now, labeler)).fetchone()[0]
        return self.labels_per_item - n_labels - n_leases

    def _current(self, c: sqlite3.Connection, labeler: str, now: float) -> sqlite3.Row | None:
        """The labeler's lease, renewed; or a new lease on the next free item; or ``None``."""
        lease = c.execute("SELECT item, expires_at, draft FROM leases WHERE labeler = ?",
                          (labeler,)).fetchone()
        if lease is not None:
            ranked = c.execute("SELECT 1 FROM labels WHERE item = ? AND labeler = ?",
                               (lease["item"], labeler)).fetchone()
            if not ranked and (lease["expires_at"] > now
                               or self._room(c, lease["item"], labeler, now) > 0):
                c.execute("UPDATE leases SET expires_at = ? WHERE labeler = ?",
                          (now + self.lease_seconds, labeler))
                return lease
            c.execute("DELETE FROM leases WHERE labeler = ?", (labeler,))
        row = c.execute(
            """SELECT i.pk FROM items i
               WHERE (SELECT COUNT(*) FROM labels l WHERE l.item = i.pk)
                   + (SELECT COUNT(*) FROM leases le WHERE le.item = i.pk
                      AND le.expires_at > :now AND le.labeler != :who) < :cap
                 AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.item = i.pk AND l.labeler = :who)
                 AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.item = i.pk AND s.labeler = :who)
               ORDER BY i.queue_pos, i.pk LIMIT 1""",
            {"now": now, "who": labeler, "cap": self.labels_per_item}).fetchone()
        if row is None:
            return None
        c.execute("INSERT INTO leases (labeler, item, expires_at, draft) VALUES (?, ?, ?, NULL)",
                  (labeler, row["pk"], now + self.lease_seconds))
        return c.execute("SELECT item, expires_at, draft FROM leases WHERE labeler = ?",
                         (labeler,)).fetchone()

    def _view(self, c: sqlite3.Connection, lease: sqlite3.Row | None, labeler: str
              ) -> dict | None:
        """What the labeler sees: the item with its responses in display order, no policies."""
        if lease is None:
            return None
        row = self._item(c, lease["item"])
        rec = json.loads(row["record"])
        perm = self.perm(row["split"], row["rid"], labeler, row["k"])
        draft = json.loads(lease["draft"]) if lease["draft"] else None
        return {"item": row["pk"], "id": row["rid"], "split": row["split"],
                "prompt": rec["prompt"], "responses": [rec["responses"][i] for i in perm],
                "k": row["k"], "lease_expires_at": lease["expires_at"], "draft": draft}

    def _progress(self, c: sqlite3.Connection, labeler: str) -> dict:
        n_items = c.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        n_labels = c.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        complete = c.execute("SELECT COUNT(*) FROM (SELECT item FROM labels GROUP BY item "
                             "HAVING COUNT(*) >= ?)", (self.labels_per_item,)).fetchone()[0]
        mine = c.execute("SELECT COUNT(*) FROM labels WHERE labeler = ?",
                         (labeler,)).fetchone()[0]
        skipped = c.execute("SELECT COUNT(*) FROM skips WHERE labeler = ?",
                            (labeler,)).fetchone()[0]
        return {"labeler": labeler, "mine": mine, "my_skips": skipped, "items": n_items,
                "items_complete": complete, "rankings": n_labels,
                "target_rankings": n_items * self.labels_per_item,
                "labels_per_item": self.labels_per_item}

    def _last(self, c: sqlite3.Connection, labeler: str) -> dict | None:
        row = c.execute("SELECT l.submission_id, l.item, i.rid FROM labels l JOIN items i "
                        "ON i.pk = l.item WHERE l.labeler = ? ORDER BY l.seq DESC LIMIT 1",
                        (labeler,)).fetchone()
        return None if row is None else {"submission_id": row[0], "item": row[1], "id": row[2]}

    def _state(self, c: sqlite3.Connection, labeler: str, now: float) -> dict:
        view = self._view(c, self._current(c, labeler, now), labeler)
        return {"item": view, "progress": self._progress(c, labeler),
                "last": self._last(c, labeler)}

    def state(self, labeler: str) -> dict:
        """The labeler's current item (leasing the next free one if needed) and progress.

        Returns:
          ``{"item": view or None, "progress": {...}, "last": {"submission_id", "item", "id"}
          or None}``; ``view`` has ``item`` (the key to submit with), ``id``, ``split``,
          ``prompt``, ``responses`` (display order), ``k``, ``lease_expires_at`` and ``draft``
          (display-order ranks to pre-fill after an undo, or None).
        """
        check_labeler(labeler)
        now = self.clock()
        with self._tx() as c:
            return self._state(c, labeler, now)

    def _act(self, labeler: str, fn: Callable, then_state: bool) -> dict:
        """Runs ``fn(c, now)`` in one transaction, plus the labeler's next state if asked (one
        commit, hence one fsync, for "store this and give me the next item")."""
        check_labeler(labeler)
        now = self.clock()
        with self._tx() as c:
            result = fn(c, now)
            if then_state:
                return {"result": result, "state": self._state(c, labeler, now)}
            return result

    # ------------------------------------------------------------------------------------------
    # Rankings.

    def submit(self, labeler: str, item: int, ranks: Sequence[int], submission_id: str, *,
               then_state: bool = False) -> dict:
        """Stores the labeler's ranking of ``item`` (``ranks`` in display order); durable on return.

        Returns:
          ``{"duplicate": False, "submission_id", "item", "id"}`` — or ``duplicate=True`` when
          this ``submission_id`` was already stored (a retry), in which case nothing is written.
          With ``then_state``: ``{"result": that, "state": <what state() returns>}``, from the
          same transaction.

        Raises:
          InvalidRanking (422): wrong length, a rank outside ``[0, K)``, ranks not dense.
          NotFound (404): no such item.
          Conflict (409): the item is not leased to this labeler, the lease expired and the item
            went to someone else, the labeler already ranked it, or the submission id was used
            for another item.
        """
        if not isinstance(submission_id, str) or not SUBMISSION_ID_RE.fullmatch(submission_id):
            raise LabelingError(f"submission_id: expected 8-64 characters from A-Z a-z 0-9 _ -, "
                                f"got {str(submission_id)[:80]!r}")

        def run(c: sqlite3.Connection, now: float) -> dict:
            prev = c.execute("SELECT item, labeler FROM labels WHERE submission_id = ?",
                             (submission_id,)).fetchone()
            if prev is not None:
                if prev["item"] != item or prev["labeler"] != labeler:
                    raise Conflict(f"submission_id {submission_id!r} was already used for "
                                   f"another ranking; use a fresh id per ranking")
                return {"duplicate": True, "submission_id": submission_id, "item": item,
                        "id": self._item(c, item)["rid"]}
            row = self._item(c, item)
            display_ranks = check_ranks(ranks, row["k"])
            if c.execute("SELECT 1 FROM labels WHERE item = ? AND labeler = ?",
                         (item, labeler)).fetchone():
                raise Conflict(f"item {item} ({row['rid']!r}): you already ranked it (undo it "
                               f"first to change the ranking)")
            lease = c.execute("SELECT item, expires_at FROM leases WHERE labeler = ?",
                              (labeler,)).fetchone()
            if lease is None or lease["item"] != item:
                cur = "none" if lease is None else f"item {lease['item']}"
                raise Conflict(f"item {item} ({row['rid']!r}) is not leased to you (your current "
                               f"item: {cur}); reload to get your next item")
            if lease["expires_at"] <= now and self._room(c, item, labeler, now) <= 0:
                raise Conflict(f"item {item} ({row['rid']!r}): your lease expired and the item "
                               f"went to another labeler; reload to get your next item")
            perm = self.perm(row["split"], row["rid"], labeler, row["k"])
            c.execute("INSERT INTO labels (item, labeler, ranks, submission_id, created_at) "
                      "VALUES (?, ?, ?, ?, ?)",
                      (item, labeler, json.dumps(to_record_order(display_ranks, perm)),
                       submission_id, now))
            c.execute("DELETE FROM leases WHERE labeler = ?", (labeler,))
            return {"duplicate": False, "submission_id": submission_id, "item": item,
                    "id": row["rid"]}

        return self._act(labeler, run, then_state)

    def skip(self, labeler: str, item: int, *, then_state: bool = False) -> dict:
        """The labeler passes on their current ``item``; it is never shown to them again.

        Idempotent (skipping an item twice is a no-op). Raises :class:`Conflict` when the item
        is not the labeler's current item and was not skipped before. ``then_state`` as in
        :meth:`submit`.
        """
        def run(c: sqlite3.Connection, now: float) -> dict:
            row = self._item(c, item)
            if c.execute("SELECT 1 FROM skips WHERE item = ? AND labeler = ?",
                         (item, labeler)).fetchone():
                return {"duplicate": True, "item": item, "id": row["rid"]}
            lease = c.execute("SELECT item FROM leases WHERE labeler = ?", (labeler,)).fetchone()
            if lease is None or lease["item"] != item:
                raise Conflict(f"item {item} ({row['rid']!r}) is not your current item; reload")
            c.execute("INSERT INTO skips (item, labeler, created_at) VALUES (?, ?, ?)",
                      (item, labeler, now))
            c.execute("DELETE FROM leases WHERE labeler = ?", (labeler,))
            return {"duplicate": False, "item": item, "id": row["rid"]}

        return self._act(labeler, run, then_state)

    def undo(self, labeler: str, submission_id: str, *, then_state: bool = False) -> dict:
        """Takes back the labeler's most recent ranking and leases its item to them again.

        The item becomes the labeler's current item, pre-filled (``draft``) with the ranking
        that was undone; the item they were looking at is released. Naming the ranking by its
        ``submission_id`` makes a retried undo harmless: the second one finds nothing to undo
        (404) instead of taking back an older ranking. ``then_state`` as in :meth:`submit`.

        Raises:
          NotFound (404): no ranking with that id by this labeler (already undone?).
          Conflict (409): that ranking is not the labeler's most recent one.
        """
        def run(c: sqlite3.Connection, now: float) -> dict:
            row = c.execute("SELECT seq, item, ranks FROM labels WHERE submission_id = ? AND "
                            "labeler = ?", (submission_id, labeler)).fetchone()
            if row is None:
                raise NotFound(f"no ranking with submission id {submission_id!r} by {labeler} "
                               f"(already undone?)")
            latest = c.execute("SELECT MAX(seq) FROM labels WHERE labeler = ?",
                               (labeler,)).fetchone()[0]
            if row["seq"] != latest:
                raise Conflict("only your most recent ranking can be undone")
            it = self._item(c, row["item"])
            perm = self.perm(it["split"], it["rid"], labeler, it["k"])
            draft = to_display_order(json.loads(row["ranks"]), perm)
            c.execute("DELETE FROM labels WHERE seq = ?", (row["seq"],))
            c.execute("DELETE FROM leases WHERE labeler = ?", (labeler,))
            c.execute("INSERT INTO leases (labeler, item, expires_at, draft) VALUES (?, ?, ?, ?)",
                      (labeler, row["item"], now + self.lease_seconds, json.dumps(draft)))
            return {"item": row["item"], "id": it["rid"], "ranks": draft}

        return self._act(labeler, run, then_state)

    # ------------------------------------------------------------------------------------------
    # Reading everything back.

    def labels(self) -> list[LabelRow]:
        """Every stored ranking, by split (queue order of the splits), item, then labeler."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT l.seq, i.split, i.rid, l.labeler, l.ranks, l.submission_id, l.created_at,"
                " i.record FROM labels l JOIN items i ON i.pk = l.item "
                "ORDER BY i.split, i.pk, l.labeler").fetchall()
        return [LabelRow(seq=r[0], split=r[1], rid=r[2], labeler=r[3], ranks=json.loads(r[4]),
                         submission_id=r[5], created_at=r[6], record=json.loads(r[7]))
                for r in rows]

    def skip_counts(self) -> dict[str, int]:
        """``{labeler: number of skipped items}``."""
        with self._lock:
            rows = self._conn.execute("SELECT labeler, COUNT(*) FROM skips GROUP BY labeler"
                                      ).fetchall()
        return {r[0]: r[1] for r in rows}

    def label_counts_per_item(self) -> dict[tuple[str, str], int]:
        """``{(split, id): number of rankings}`` for every item (0 included)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT i.split, i.rid, (SELECT COUNT(*) FROM labels l WHERE l.item = i.pk) "
                "FROM items i ORDER BY i.pk").fetchall()
        return {(r[0], r[1]): r[2] for r in rows}


def default_db_path(source: str | os.PathLike) -> pathlib.Path:
    """Where ``serve``/``export`` keep the database for a source: next to its JSONL files.

    ``source`` is a collect workdir (its ``to_label/`` folder is used), a folder of ``*.jsonl``,
    a single ``.jsonl`` file, or a database file itself (returned as is).
    """
    p = pathlib.Path(source)
    if p.is_file():
        return p if p.suffix != ".jsonl" else p.parent / DEFAULT_DB_NAME
    if (p / "to_label").is_dir() and (any((p / "to_label").glob("*.jsonl"))
                                      or (p / "to_label" / DEFAULT_DB_NAME).exists()):
        return p / "to_label" / DEFAULT_DB_NAME
    return p / DEFAULT_DB_NAME
