"""`ray submit` entry point: join the running Ray cluster and train.

    ray submit deploy/ray/cluster.yaml deploy/ray/train_job.py -- --workers 8 --epochs 20

The cluster launcher uploads this file to the head node as ~/train_job.py and
runs it there with `python`, so the coordinator (and its --metrics-port) lives on
the head node. Every argument after `--` is a `distbackprop train` flag; the exit
status is train's (0 success, 1 training failed, 2 invalid configuration).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    """Run `distbackprop train ARGV` against the cluster this node belongs to."""
    # "auto" finds the cluster started on this node by `ray start` (its address
    # file under the Ray temp dir). An explicit --ray-address or RAY_ADDRESS wins.
    os.environ.setdefault("RAY_ADDRESS", "auto")
    from distbackprop.cli import main as cli_main

    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
