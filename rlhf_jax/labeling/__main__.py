"""Command line: ``python -m rlhf_jax.labeling {serve,export,simulate,tokens,agreement} ...``.

Run ``python -m rlhf_jax.labeling <command> --help`` for the options; the package docstring
(:mod:`rlhf_jax.labeling`) describes a whole session.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import sqlite3
import sys
from typing import Sequence


def _db_for(path: str) -> pathlib.Path:
    from rlhf_jax.labeling.store import default_db_path
    return default_db_path(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from rlhf_jax.labeling.server import is_loopback, serve
    from rlhf_jax.labeling.store import LabelStore

    if args.source is None and args.db is None:
        raise SystemExit("serve: give the source (collect workdir or JSONL folder/file), or --db "
                         "of an existing session")
    if not is_loopback(args.host) and args.tokens_file is None:
        raise SystemExit(f"serve: --host {args.host} is reachable from other machines; pass "
                         f"--tokens-file (one '<labeler> <token>' line per labeler; "
                         f"`python -m rlhf_jax.labeling tokens NAME... --out FILE` writes one)")
    db = pathlib.Path(args.db) if args.db else _db_for(args.source)
    if args.source is None and not db.is_file():
        raise SystemExit(f"serve: no labeling database at {db}; give the source files")
    store = LabelStore(db, labels_per_item=args.labels_per_item, lease_seconds=args.lease_seconds)
    if args.source is not None:
        from rlhf_jax.labeling.records import load_sources
        info = load_sources(store, args.source)
        print(f"[labeling] {', '.join(info['files'])}: {info['added']} new items, "
              f"{info['present']} already in the database", file=sys.stderr)
    splits = store.splits()
    if not splits:
        raise SystemExit(f"serve: {db} holds no items")
    print(f"[labeling] db {db}: {sum(splits.values())} items "
          f"({', '.join(f'{k} {v}' for k, v in splits.items())}), {args.labels_per_item} "
          f"labeler(s) per item, leases of {args.lease_seconds:g} s", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"[labeling] serving http://{host}:{args.port}/ "
          f"({'token links' if args.tokens_file else 'labelers type their name'}); "
          f"agreement at /agreement", file=sys.stderr, flush=True)
    try:
        serve(store, host=args.host, port=args.port, tokens_file=args.tokens_file,
              max_body_bytes=args.max_body_bytes)
    finally:
        store.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rlhf_jax.labeling.records import export_rankings

    counts = export_rankings(_db_for(args.db), args.out)
    for split, n in counts.items():
        print(f"[labeling] {split}: {n} rankings"
              + (f" -> {pathlib.Path(args.out) / (split + '.jsonl')}" if n else ""),
              file=sys.stderr)
    print(f"[labeling] finish the collect stage with: python -m experiments.collect ... "
          f"--labeler import --rankings-file {args.out}", file=sys.stderr)
    return 0 if any(counts.values()) else 1


def cmd_agreement(args: argparse.Namespace) -> int:
    from rlhf_jax.labeling.agreement import agreement_report
    from rlhf_jax.labeling.store import LabelStore

    with LabelStore(_db_for(args.db), create=False) as store:
        report = agreement_report(store.labels(), store.skip_counts())
    print(json.dumps(report, indent=1))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from rlhf_jax.labeling.client import GoldLookup, LabelingClient, simulate

    if (args.gold_from is None) == (args.gold_path is None):
        raise SystemExit("simulate: give exactly one of --gold-from (JSONL with gold_scores) or "
                         "--gold-path (a saved gold scorer)")
    gold = (GoldLookup.from_source(args.gold_from) if args.gold_from
            else GoldLookup.from_scorer(args.gold_path))
    token = args.token or os.environ.get("LABELING_TOKEN")
    with LabelingClient(args.url, labeler=None if token else args.labeler, token=token,
                        retry_seconds=args.retry_seconds) as client:
        res = simulate(client, gold, labeler=args.labeler, temperature=args.temperature,
                       seed=args.seed, max_items=args.max_items)
    lat = sorted(res.latencies)
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1e3 if lat else float("nan")
    print(json.dumps({"labeler": res.labeler, "ranked": res.ranked, "skipped": res.skipped,
                      "duplicates": res.duplicates, "retries": res.retries,
                      "p95_submit_ms": round(p95, 2)}))
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from rlhf_jax.labeling.store import check_labeler, LabelingError

    out = pathlib.Path(args.out)
    if out.exists():
        raise SystemExit(f"tokens: {out} exists; not overwriting it")
    lines = []
    for name in args.names:
        try:
            check_labeler(name)
        except LabelingError as e:
            raise SystemExit(f"tokens: {e.message}") from None
        lines.append((name, secrets.token_urlsafe(24)))
    if len({n for n, _ in lines}) != len(lines):
        raise SystemExit("tokens: a name is repeated")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# <labeler> <token>; give each labeler their link, keep this file private\n")
        for name, token in lines:
            f.write(f"{name} {token}\n")
    print(f"[labeling] wrote {len(lines)} tokens to {out}", file=sys.stderr)
    if args.url:
        for name, token in lines:
            print(f"{name}\t{args.url.rstrip('/')}/?token={token}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf_jax.labeling",
                                description="Let people rank responses in a browser.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the labeling web app")
    s.add_argument("source", nargs="?", help="collect workdir (uses its to_label/), a folder of "
                   "*.jsonl or one .jsonl; optional when --db names an existing session")
    s.add_argument("--db", help="SQLite file (default: labels.sqlite next to the JSONL files)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback "
                   "needs --tokens-file")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--labels-per-item", type=int, default=1,
                   help="how many labelers rank each item")
    s.add_argument("--lease-seconds", type=float, default=600.0,
                   help="how long an item stays reserved for the labeler it was shown to")
    s.add_argument("--tokens-file", help="'<labeler> <token>' per line; required off loopback")
    s.add_argument("--max-body-bytes", type=int, default=64 * 1024)
    s.set_defaults(fn=cmd_serve)

    e = sub.add_parser("export", help="write <out>/{train,eval}.jsonl from a session's rankings "
                       "(exit status 1 when there is no ranking at all)")
    e.add_argument("db", help="the SQLite file, or the source/workdir it was created for")
    e.add_argument("--out", required=True, help="folder for <split>.jsonl")
    e.set_defaults(fn=cmd_export)

    a = sub.add_parser("agreement", help="print the agreement report (JSON)")
    a.add_argument("db", help="the SQLite file, or the source/workdir it was created for")
    a.set_defaults(fn=cmd_agreement)

    m = sub.add_parser("simulate", help="a simulated labeler ranking through the HTTP API")
    m.add_argument("url", help="e.g. http://127.0.0.1:8765")
    m.add_argument("--labeler", default="simulated", help="name (servers without tokens)")
    m.add_argument("--token", help="token (servers with tokens; or env LABELING_TOKEN)")
    m.add_argument("--gold-from", help="JSONL file/folder whose records carry gold_scores")
    m.add_argument("--gold-path", help="a saved GoldSentimentScorer (pickle)")
    m.add_argument("--temperature", type=float, default=0.5, help="Bradley-Terry noise τ")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--max-items", type=int, default=None)
    m.add_argument("--retry-seconds", type=float, default=60.0)
    m.set_defaults(fn=cmd_simulate)

    t = sub.add_parser("tokens", help="write a tokens file with a random token per labeler")
    t.add_argument("names", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--url", help="print each labeler's link for this server URL")
    t.set_defaults(fn=cmd_tokens)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, sqlite3.DatabaseError) as e:  # DataError: ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
