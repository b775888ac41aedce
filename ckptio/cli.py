"""The ``ckptio`` command: inspect, ls, convert, export and verify checkpoints at any URI (DCP ones too)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .dcp import architecture_arg
from .discovery import list_checkpoints
from .errors import CheckpointError, CheckpointNotFoundError
from .tools import convert, export, inspect_checkpoint, verify
from .version import __version__

_STATUS = {"ok": "OK        ", "bad": "BAD       ", "unverified": "UNVERIFIED", "gone": "GONE      "}


def _json_object(raw: str, source: str, what: str = "a JSON object") -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{source} must be {what}, got {type(doc).__name__}")
    return doc


def _storage_options(raw: str | None) -> dict[str, Any]:
    return _json_object(raw, "--storage-options") if raw else {}


def _run(args: argparse.Namespace) -> int:
    opts = _storage_options(args.storage_options)
    if args.command == "inspect":
        print(json.dumps(inspect_checkpoint(args.uri, opts), indent=2, default=str))
    elif args.command == "ls":
        infos = list_checkpoints(args.uri, opts)
        if not infos:
            raise CheckpointNotFoundError(f"{args.uri}: no checkpoints in this directory")
        for info in infos:
            print(f"{info.epoch}\t{info.format}\t{info.uri}")
    elif args.command == "convert":
        architecture = architecture_arg(args.architecture) if args.architecture else None
        print(convert(args.src, args.dst, trusted=args.trusted, storage_options=opts, epoch=args.epoch,
                      architecture=architecture, model_key=args.model_key))  # fmt: skip
    elif args.command == "export":
        if args.hf:
            config = None
            if args.config:
                with open(args.config, encoding="utf-8") as f:
                    config = _json_object(f.read(), args.config, "a JSON object (a config.json)")
            print(export(args.src, args.dst, storage_options=opts, hf=True, config=config, dtype=args.dtype,
                         max_shard_size=args.max_shard_size))  # fmt: skip
        elif args.config or args.dtype or args.max_shard_size:
            raise CheckpointError("--config, --dtype and --max-shard-size go with export --hf")
        else:
            print(export(args.src, args.dst, storage_options=opts))
    elif args.command == "verify":
        results = verify(args.uri, opts)
        for r in results:
            print(f"{_STATUS[r.status]} {r.uri}" + (f": {r.detail}" if r.detail else ""))
        return 1 if any(not r.ok for r in results) else 0
    return 0


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    # one line, as errors are: a terminal user wants the warning, not the source line that issued it
    print(f"ckptio: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckptio", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ckptio {__version__}")
    options_help = "JSON object passed to fsspec for remote URIs: endpoint, credentials, ..."
    parser.add_argument("--storage-options", help=options_help)
    # accepted after the subcommand too, where users put it (SUPPRESS: absent there, the one above stands)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-options", default=argparse.SUPPRESS, help=options_help)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="print a checkpoint's format, epoch, tensors, bytes, metrics, architecture as JSON (a DCP "
        "directory: its keys, shapes, dtypes and bytes)",
    )
    p.add_argument("uri", help="a checkpoint file, a run directory (its latest), or a DCP directory; any URI")
    p = sub.add_parser("ls", parents=[common], help="list a directory's checkpoints, oldest first")
    p.add_argument("uri", help="a run directory or a directory of checkpoint files; any URI")
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="rewrite a checkpoint as .safetensors or .pt (by DST's extension), a run into DST/, or a "
        "torch.distributed.checkpoint directory into one .safetensors file or a run DST/ (streamed)",
    )
    p.add_argument("src", help="a checkpoint file, a run directory (its latest), or a DCP directory")
    p.add_argument("dst", help="a .safetensors or .pt file name, or a directory ending in / for a run")
    p.add_argument("--trusted", action="store_true", help="allow unpickling a whole module from a .pt you trust")
    p.add_argument("--epoch", type=int, help="a DCP source: the epoch to name it (default: its own step, else 0)")
    p.add_argument(
        "--architecture",
        help='a DCP source: the run\'s architecture, {"class_path": ..., "config": {...}} or a class path',
    )
    p.add_argument("--model-key", default="model", help="a DCP source: the top-level key of the model (default: model)")
    p = sub.add_parser(
        "export",
        parents=[common],
        help="copy a checkpoint with all its files (metrics, trainer state, architecture) under a new name or "
        "place: DST is a file name, or a directory ending in /; with --hf, DST is a folder from_pretrained loads",
    )
    p.add_argument("src", help="a checkpoint file, or a run directory (its latest)")
    p.add_argument("dst", help="the copy's file name, or a directory ending in / (the source's name kept)")
    p.add_argument(
        "--hf", action="store_true", help="write a Hugging Face folder: config.json, model.safetensors or shards"
    )
    p.add_argument("--config", help="--hf: the config.json to write (default: the checkpoint's transformers config)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="--hf: cast floating tensors")
    p.add_argument("--max-shard-size", help="--hf: shard above this size, e.g. 5GB or 500MiB (default: one file)")
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check every file of each checkpoint against its digest; exit 1 if any is bad "
        "(UNVERIFIED: valid, but carries no digest to check its contents; GONE: deleted or replaced "
        "while being verified, as retention does on a live run: not an error)",
    )
    p.add_argument("uri", help="a checkpoint file, or a directory (every checkpoint in it)")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return _run(args)
    except BrokenPipeError:
        # the reader left (ckptio ls DIR | head -1): what it wanted was printed; no error, no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CheckpointError, OSError, ValueError) as e:
        # one line: a terminal user wants the reason, not a traceback
        print(f"ckptio: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
