"""The ``ckptio`` command: inspect, ls, convert and verify checkpoints at any URI."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import CheckpointError
from .manager import convert, inspect_checkpoint, list_checkpoints, verify


def _storage_options(raw: str | None) -> dict:
    return json.loads(raw) if raw else {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckptio", description=__doc__)
    parser.add_argument("--storage-options", help="JSON object passed to fsspec (endpoint, credentials, ...)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect", help="print a checkpoint's format, epoch, tensors, bytes, metrics, architecture as JSON"
    )
    p.add_argument("uri")
    p = sub.add_parser("ls", help="list a directory's checkpoints, oldest first")
    p.add_argument("uri")
    p = sub.add_parser("convert", help="rewrite a checkpoint as .safetensors or .pt (by DST's extension)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--trusted", action="store_true", help="allow unpickling a whole module from a .pt you trust")
    p = sub.add_parser("verify", help="recompute content digests; exit 1 if any checkpoint is bad")
    p.add_argument("uri")
    args = parser.parse_args(argv)
    opts = _storage_options(args.storage_options)
    try:
        if args.command == "inspect":
            print(json.dumps(inspect_checkpoint(args.uri, opts), indent=2, default=str))
        elif args.command == "ls":
            for info in list_checkpoints(args.uri, opts):
                print(f"{info.epoch}\t{info.format}\t{info.uri}")
        elif args.command == "convert":
            print(convert(args.src, args.dst, trusted=args.trusted, storage_options=opts))
        elif args.command == "verify":
            results = verify(args.uri, opts)
            for uri, error in results:
                print(f"OK   {uri}" if error is None else f"BAD  {uri}: {error}")
            return 1 if any(error for _, error in results) else 0
    except CheckpointError as e:
        print(f"ckptio: error: {e}", file=sys.stderr)
        return 2
    return 0
