"""Prepare a dataset's frames once, ahead of training (:mod:`hawor_tune.data.build`)::

    python -m hawor_tune.data.prepare --config configs/arctic.yaml data.root=/data/arctic/arctic_data/data
    python -m hawor_tune.data.prepare --config configs/arctic.yaml --workers 16
    python -m hawor_tune.data.prepare --config configs/arctic.yaml --address auto   # Ray tasks on a cluster

Prints the estimated size and time, checks the free space, shows a progress bar with the ETA, and ends with the
prepared folder. Bad input (a config value, a damaged image, too little space) prints one line and exits 2;
Ctrl-C keeps the shards written so far and exits 130: the same command continues.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hawor_tune.data import prepare_dataset
from hawor_tune.data.build import format_bytes
from hawor_tune.errors import HaworTuneError


def main(argv: list[str] | None = None) -> int:
    from hawor_tune.cli import ArgumentParser, fail, positive_int
    from hawor_tune.config import load_config

    parser = ArgumentParser(prog="python -m hawor_tune.data.prepare", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="experiment YAML (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"],
                        help="splits to prepare (default: all; a split without labels is skipped)")
    parser.add_argument("--workers", type=positive_int, help="processes (default: every usable CPU)")
    parser.add_argument("--address", help="prepare with Ray tasks on this cluster (e.g. auto, or ray://host:10001)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        shards = prepare_dataset(cfg, splits=args.splits, workers=args.workers, address=args.address)
    except HaworTuneError as e:
        return fail(e)
    except KeyboardInterrupt:
        print("error: interrupted; the shards written so far are kept: run the same command again to continue",
              file=sys.stderr)
        return 130
    total = sum(p.stat().st_size for p in shards.folder.rglob("*") if p.is_file())
    print(f"prepared: {shards.folder} ({len(shards.names)} sequences, {len(shards.image_index)} frames, {format_bytes(total)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
