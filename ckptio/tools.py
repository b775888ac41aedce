"""Tools on anyone's checkpoint: convert between formats, inspect, verify. None of them imports code.

The ``ckptio`` command is a thin shell over these.
"""

from __future__ import annotations

import json
import posixpath
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .architecture import architecture_to_json
from .artifact import MockArchitecture
from .discovery import locate, resolve, scan
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    save_failed,
    typed_io,
)
from .formats import WRITER_KEYS, check_digest, write_safetensors
from .layout import (
    MANIFEST_NAME,
    WEIGHT_EXTENSIONS,
    Sidecars,
    architecture_record,
    epoch_of,
    open_weights,
    read_metadata,
    read_metrics,
    read_trainer_state,
    read_weights,
    state_dict_of,
    write_checkpoint,
)
from .storage import Storage

__all__ = ["VerifyResult", "convert", "export", "inspect_checkpoint", "verify", "verify_checkpoint"]


def export(src: str, dst: str, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """Copy a checkpoint as a self-contained unit to ``dst``: a file name (any) or a directory (ending in /).

    The weights keep their bytes; the sidecars their header names are copied beside them under those
    names, first, and the weights last (the commit point, by atomic rename where the store has one).
    A checkpoint whose architecture lives in its run's manifest gets it in its header, so the copy
    needs no run directory. Returns the copy's URI, verified.
    """
    with typed_io(src, "reading"):
        storage, name = locate(src, storage_options)
        metadata = read_metadata(storage, name)
        sidecars = Sidecars.of(name.rsplit(".", 1)[0], metadata, storage.url(name))
        record = (
            None
            if "ckptio.architecture" in metadata
            else architecture_record(storage, name.rsplit(".", 1)[0], metadata)
        )
    directory, leaf = posixpath.split(dst) if not dst.endswith("/") else (dst.rstrip("/"), posixpath.basename(name))
    if posixpath.splitext(leaf)[1] != posixpath.splitext(name)[1]:
        raise CheckpointFormatError(
            f"{dst}: an export keeps the format; name it {posixpath.splitext(name)[1]} (convert changes it)"
        )
    target = Storage(directory or ".", dict(storage_options or {}))
    uri = target.url(leaf)
    if target.exists(leaf):
        raise InvalidArgumentError(f"{uri}: exists; export never overwrites a checkpoint")

    def copy(from_name: str) -> Any:
        def writer(f: Any) -> None:
            with storage.open(from_name, "rb") as source:
                shutil.copyfileobj(source, f, 1 << 20)

        return writer

    try:
        for sidecar in sidecars.names():
            if storage.exists(sidecar):
                target.write(sidecar, copy(sidecar))
        if record is not None and name.endswith(".safetensors"):
            tensors, _ = read_weights(storage, name)
            meta = {k: v for k, v in metadata.items() if k not in WRITER_KEYS}
            meta["ckptio.architecture"] = record[1] if isinstance(record[1], str) else record[1].decode()
            target.write(leaf, lambda f: write_safetensors(f, tensors, meta))
        else:
            target.write(leaf, copy(name))
    except CheckpointError:
        raise
    except Exception as e:
        raise save_failed(uri, "exporting", e) from e
    bad = [r for r in verify_checkpoint(target, leaf) if not r.ok]
    if bad:
        raise CorruptCheckpointError(f"{uri}: the export does not verify: {bad[0].uri}: {bad[0].detail}")
    return uri


def convert(src: str, dst: str, *, trusted: bool = False, storage_options: Mapping[str, Any] | None = None) -> str:
    """Rewrite a checkpoint in the format named by ``dst``'s extension (.safetensors or .pt).

    Copies the weights, metrics, epoch and the architecture record as they are: the architecture's
    class is never imported.
    """
    if not dst.endswith(WEIGHT_EXTENSIONS):
        raise CheckpointFormatError(f"{dst}: destination must end in .safetensors or .pt")
    with typed_io(src, "reading"):
        storage, name = locate(src, storage_options)
        obj, metadata = read_weights(storage, name, trusted=trusted)
        metrics = read_metrics(storage, name, metadata) if not isinstance(obj, torch.nn.Module) else None
        record = architecture_record(storage, name.rsplit(".", 1)[0], metadata)
    arch_json = None
    if record is not None:
        try:
            arch_json = json.loads(record[1])
        except ValueError as e:
            raise CheckpointFormatError(f"{record[0]}: architecture record is not valid JSON: {e}") from None
    state = state_dict_of(obj)
    directory, out_name = posixpath.split(dst)
    out = Storage(directory or ".", dict(storage_options or {}))
    base, fmt = out_name.rsplit(".", 1)
    try:
        return write_checkpoint(
            out,
            base,
            state,
            architecture_json=arch_json,
            epoch=epoch_of(name, metadata),
            training_metrics=metrics,
            checkpoint_format=fmt,
        ).uri
    except (CheckpointFormatError, InvalidArgumentError):
        raise
    except Exception as e:
        raise save_failed(out.url(out_name), "converting " + src, e) from e


def inspect_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe a checkpoint without importing its architecture: format, epoch, tensors, bytes, metrics."""
    if uri.startswith("mock://"):
        return {
            "uri": uri, "format": "mock", "epoch": None, "tensor_count": 0, "total_bytes": 0, "dtypes": {},
            "metrics": None, "architecture": architecture_to_json(MockArchitecture()), "digest": None, "files": [],
        }  # fmt: skip
    storage, name = locate(uri, storage_options)
    obj, metadata = read_weights(storage, name, mmap=None)
    tensors = state_dict_of(obj)
    arch_raw = metadata.get("ckptio.architecture")
    if arch_raw is None and storage.exists(MANIFEST_NAME):
        arch_raw = storage.read_bytes(MANIFEST_NAME).decode("utf-8", "replace")
    unique = {id(t): t for t in tensors.values()}
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        dtypes[str(t.dtype).removeprefix("torch.")] = dtypes.get(str(t.dtype).removeprefix("torch."), 0) + 1
    try:
        architecture = json.loads(arch_raw) if arch_raw else None
    except ValueError:
        architecture = arch_raw
    return {
        "uri": storage.url(name),
        "format": name.rsplit(".", 1)[1],
        "epoch": epoch_of(name, metadata),
        "tensor_count": len(tensors),
        "total_bytes": sum(t.numel() * t.element_size() for t in unique.values()),
        "dtypes": dtypes,
        "metrics": read_metrics(storage, name, metadata),
        "architecture": architecture,
        "digest": metadata.get("ckptio.crc32"),
        "weights_key": metadata.get("ckptio.pt_key"),  # a .pt training checkpoint: the entry the weights came from
        "files": [storage.url(n) for n in [*Sidecars.of(name.rsplit(".", 1)[0], metadata, name).names(), name]
                  if storage.exists(n)],
    }  # fmt: skip


@dataclass(frozen=True)
class VerifyResult:
    """One file's verdict: ``ok`` (digest matches), ``bad`` (damaged or missing), ``unverified`` (no digest)
    or ``gone`` (its checkpoint was deleted or replaced while being verified: retention on a live run)."""

    uri: str
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "bad"


_GONE = "deleted or replaced while it was being verified (retention or a re-save of a live run), not damaged"


def _verdict(error: CheckpointError, uri: str) -> VerifyResult:
    # CheckpointNotFoundError here means the checkpoint itself vanished or moved on (its weights are gone,
    # or name another save): a sidecar missing from a checkpoint that is still there is CorruptCheckpointError
    if isinstance(error, CheckpointNotFoundError):
        return VerifyResult(uri, "gone", _GONE)
    return VerifyResult(uri, "bad", _detail(error, uri))


def _verify_weights(storage: Storage, name: str) -> tuple[VerifyResult, dict[str, str] | None]:
    uri = storage.url(name)
    if not name.endswith(".safetensors"):  # .pt has no digest: a full load is the check
        try:
            metadata = read_weights(storage, name, mmap=False)[1]
        except CheckpointError as e:
            return _verdict(e, uri), None
        return VerifyResult(uri, "unverified", "loads, but .pt files carry no digest"), metadata
    try:
        with open_weights(storage, name) as f:
            metadata = check_digest(f, uri)
        if metadata is None:
            unverified = VerifyResult(uri, "unverified", "header and offsets valid; no digest to check contents")
            return unverified, read_metadata(storage, name)
        return VerifyResult(uri, "ok"), metadata
    except CheckpointError as e:
        return _verdict(e, uri), None


def _detail(error: BaseException, uri: str) -> str:
    """The error message without the file name it starts with (the caller prints the name once)."""
    text = str(error)
    return text[len(uri) + 2 :] if text.startswith(uri + ": ") else text


def verify_checkpoint(storage: Storage, name: str) -> list[VerifyResult]:
    """Verify every file of one checkpoint: weights, metrics and trainer state, each against its digest."""
    weights, metadata = _verify_weights(storage, name)
    results = [weights]
    if metadata is None:
        return results
    sidecars = Sidecars.of(name.rsplit(".", 1)[0], metadata, weights.uri)
    if sidecars.moved:  # a copy: what is not beside it is not there to check (nor damage)
        results += [
            VerifyResult(storage.url(n), "unverified", "saved with this checkpoint; not beside this copy")
            for n in sidecars.names()
            if not storage.exists(n)
        ]
    present = [n for n in sidecars.names() if not sidecars.moved or storage.exists(n)]
    if sidecars.metrics in present and (sidecars.declared or storage.exists(sidecars.metrics)):
        uri = storage.url(sidecars.metrics)
        try:
            read_metrics(storage, name, metadata)
            status = "ok" if sidecars.metrics_crc32 else "unverified"
            results.append(VerifyResult(uri, status, "" if sidecars.metrics_crc32 else "valid JSON; no digest"))
        except CheckpointError as e:
            results.append(_verdict(e, uri))
    if sidecars.trainer in present and (sidecars.declared or storage.exists(sidecars.trainer)):
        uri = storage.url(sidecars.trainer)
        try:
            read_trainer_state(storage, name, metadata, verify=True)
            results.append(VerifyResult(uri, "ok"))
        except CheckpointError as e:
            results.append(_verdict(e, uri))
    return results


def verify(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[VerifyResult]:
    """Fully verify a checkpoint file, or every checkpoint in a directory: one result per file."""
    storage, name = resolve(uri, storage_options)
    names = [name] if name is not None else [i.name for i in scan(storage)]
    if not names:
        raise CheckpointNotFoundError(f"{uri}: no checkpoints in this directory")
    return [r for n in names for r in verify_checkpoint(storage, n)]
