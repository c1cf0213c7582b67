"""Build the project's TFDS datasets (array_record; no TensorFlow needed).

Usage::

    python -m rlhf_jax.data.build imdb            # offline, ~15-30 s, into ~/tensorflow_datasets
    python -m rlhf_jax.data.build imdb --data-dir /tmp/tfds  # or $TFDS_DATA_DIR
    python -m rlhf_jax.data.build comparisons --source runs/collect/comparisons --name round1
    python -m rlhf_jax.data.build tldr-sft                   # needs internet
    python -m rlhf_jax.data.build tldr-comparisons           # needs internet
    python -m rlhf_jax.data.build hh --config helpful_base   # needs internet

Idempotent: a dataset already in the data dir is reused (comparisons are rebuilt when their source
files changed). Prints the split sizes, where the data lives, and what was skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DATASETS = ("imdb", "comparisons", "tldr-sft", "tldr-comparisons", "hh")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_jax.data.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=DATASETS)
    ap.add_argument("--data-dir", default=None,
                    help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    ap.add_argument("--source", default=None, help="comparisons: JSONL file or directory")
    ap.add_argument("--name", default="default", help="comparisons: dataset config name")
    ap.add_argument("--config", default=None, help="hh: subset config (default helpful_base)")
    ap.add_argument("--on-error", choices=("raise", "skip"), default=None,
                    help="bad records: raise (default for local files) or skip and count "
                         "(default for downloads)")
    ap.add_argument("--progress", action="store_true", help="show TFDS progress bars")
    args = ap.parse_args(argv)

    import tensorflow_datasets as tfds

    from rlhf_jax.data import tfds_utils
    if not args.progress:
        tfds.disable_progress_bar()
    data_dir = os.path.expanduser(args.data_dir or tfds_utils.default_data_dir())
    t0 = time.perf_counter()
    if args.dataset == "imdb":
        from rlhf_jax.data import imdb
        builder, sources = imdb.build_imdb(data_dir, on_error=args.on_error or "raise")
    elif args.dataset == "comparisons":
        from rlhf_jax.data import comparisons
        if not args.source:
            ap.error("comparisons needs --source (a JSONL file or a directory of them)")
        builder, sources = comparisons.build_comparisons(args.source, data_dir, name=args.name,
                                                         on_error=args.on_error or "raise")
    else:
        if args.dataset == "hh":
            from rlhf_jax.data.hh import HhRlhf as cls
        elif args.dataset == "tldr-sft":
            from rlhf_jax.data.tldr import TldrSft as cls
        else:
            from rlhf_jax.data.tldr import TldrComparisons as cls
        kwargs = {"config": args.config} if args.config else {}
        builder = cls(data_dir=data_dir, on_error=args.on_error or "skip", **kwargs)
        sources = tfds_utils.prepare(builder)
    dt = time.perf_counter() - t0
    print(f"{builder.name}: {builder.data_dir}")
    for split, src in sources.items():
        print(f"  {split:>10}: {len(src)} examples")
    print(f"ready in {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
