"""Evaluate a policy from any URI (file, run directory, s3://, gs://, memory://, mock://).

python -m launch.evaluate --uri runs/demo --episodes 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run by path (python launch/train.py): the repository holds launch/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ckptio
from launch.tasks import BanditTask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uri", required=True)
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage-options", help="JSON passed to fsspec")
    p.add_argument("--allow", action="append", default=[], metavar="MODULE",
                   help="also import architecture classes from this module prefix (repeatable); launch is allowed")  # fmt: skip
    args = p.parse_args(argv)
    opts = json.loads(args.storage_options) if args.storage_options else None
    artifact = ckptio.load_from_uri(args.uri, allow=["launch", *args.allow], storage_options=opts)
    task = BanditTask()
    policy = artifact.instantiate(task.metadata)  # the environment's metadata is known only now
    policy.eval()
    reward = task.evaluate(policy, args.episodes, args.seed)
    print(json.dumps({"uri": args.uri, "source": artifact.source, "epoch": artifact.epoch,
                      "policy": type(policy).__name__, "episodes": args.episodes, "mean_reward": round(reward, 4)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
