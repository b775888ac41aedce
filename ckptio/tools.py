"""Tools on anyone's checkpoint: convert between formats, inspect, verify. None of them imports code.

The ``ckptio`` command is a thin shell over these.
"""

from __future__ import annotations

import json
import logging
import posixpath
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .architecture import architecture_to_json
from .artifact import MockArchitecture
from .dcp import convert_dcp, describe_dcp, is_dcp
from .discovery import list_checkpoints, locate, resolve, scan
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
from .hf import HF_CONFIG, HF_INDEX, HF_WEIGHTS, is_hf_name, read_index, read_shards, shard_names, write_hf
from .layout import (
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    METRICS_SUFFIX,
    TRAINER_SUFFIX,
    WEIGHT_EXTENSIONS,
    Sidecars,
    architecture_record,
    checkpoint_of,
    epoch_of,
    files_of,
    format_of,
    open_weights,
    read_metadata,
    read_metrics,
    read_pt_training_state,
    read_trainer_state,
    read_weights,
    sanitize_run_name,
    state_dict_of,
    write_checkpoint,
    write_manifest,
)
from .storage import Storage, is_temporary
from .trainer_state import flatten
from .version import __version__

log = logging.getLogger("ckptio")

__all__ = ["VerifyResult", "convert", "export", "inspect_checkpoint", "verify", "verify_checkpoint"]


def export(
    src: str,
    dst: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    hf: bool = False,
    config: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
) -> str:
    """Copy a checkpoint as a self-contained unit to ``dst``: a file name (any) or a directory (ending in /).

    The weights keep their bytes; the sidecars their header names are copied beside them under those
    names, first, and the weights last (the commit point, by atomic rename where the store has one).
    A checkpoint whose architecture lives in its run's manifest gets it in its header, so the copy
    needs no run directory. Returns the copy's URI, verified.

    With ``hf``, ``dst`` is a folder ``from_pretrained`` loads (the weights alone, no sidecars): ``config.json``
    from ``config`` or a transformers architecture, ``model.safetensors``, or shards of at most
    ``max_shard_size`` with their index; floating tensors cast to ``dtype`` ("bfloat16", "float16", "float32").
    """
    if hf:
        return _export_hf(src, dst, storage_options, config, dtype, max_shard_size)
    if config is not None or dtype is not None or max_shard_size is not None:
        raise InvalidArgumentError("config, dtype and max_shard_size apply to an export with hf=True")
    with typed_io(src, "reading"):
        storage, name = locate(src, storage_options)
        metadata = read_metadata(storage, name)
        sidecars = Sidecars.of(name, metadata, storage.url(name))
        record = None if "ckptio.architecture" in metadata else architecture_record(storage, name, metadata)
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


def _export_hf(
    src: str,
    dst: str,
    storage_options: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
    dtype: str | None,
    max_shard_size: int | str | None,
) -> str:
    with typed_io(src, "reading"):
        storage, name = locate(src, storage_options)
        if not name.endswith(".safetensors") or is_hf_name(name):
            raise CheckpointFormatError(f"{storage.url(name)}: export --hf takes a ckptio .safetensors checkpoint")
        metadata = read_metadata(storage, name)
        record = architecture_record(storage, name, metadata)
    if config is None and record is not None:
        try:
            arch = json.loads(record[1])
        except ValueError:
            arch = None
        if isinstance(arch, dict) and str(arch.get("class_path", "")).startswith("transformers."):
            config = arch.get("config")
    if config is not None and not isinstance(config.get("model_type"), str):
        raise CheckpointFormatError(f"the config for {dst}/{HF_CONFIG} has no 'model_type'; from_pretrained needs it")
    out = Storage(dst.rstrip("/") or ".", dict(storage_options or {}))
    taken = [n for n in (HF_WEIGHTS, HF_INDEX) if out.exists(n)]
    if taken:
        raise InvalidArgumentError(f"{out.url(taken[0])}: exists; export never overwrites a model")
    try:
        written = write_hf(storage, name, out, config=config, dtype=dtype, max_shard_size=max_shard_size)
    except CheckpointError:
        raise
    except Exception as e:
        raise save_failed(out.url(), "exporting " + storage.url(name), e) from e
    if config is None:
        log.warning(
            "%s: no config.json written (%s carries no transformers config): pass config= (ckptio export --hf "
            "--config FILE) for from_pretrained",
            out.url(),
            storage.url(name),
        )
    bad = [r for r in verify_checkpoint(out, posixpath.basename(written[-1])) if not r.ok]
    if bad:
        raise CorruptCheckpointError(f"{out.url()}: the export does not verify: {bad[0].uri}: {bad[0].detail}")
    return out.url()


def _converted(storage: Storage, name: str, trusted: bool) -> dict[str, Any]:
    """What a converted copy keeps of one checkpoint: weights, metrics, epoch, trainer state, architecture."""
    obj, metadata = read_weights(storage, name, trusted=trusted)
    module = isinstance(obj, torch.nn.Module)
    epoch = epoch_of(name, metadata)
    trainer = None if module else read_trainer_state(storage, name, metadata, verify=True)
    if trainer is not None:  # what the writer computes itself (digest, layout) is written anew
        trainer = (trainer[0], {k: v for k, v in trainer[1].items() if k not in WRITER_KEYS})
    if trainer is None and not module and metadata.get("ckptio.pt_key"):
        extras = read_pt_training_state(storage, name)  # a .pt training checkpoint's optimizer, scheduler...
        if extras:
            trainer = flatten({"user": extras, "epoch": epoch})  # what resuming the .pt itself would give
    record = architecture_record(storage, name, metadata)
    arch_json = None
    if record is not None:
        try:
            arch_json = json.loads(record[1])
        except ValueError as e:
            raise CheckpointFormatError(f"{record[0]}: architecture record is not valid JSON: {e}") from None
    return {
        "state": state_dict_of(obj),
        "metrics": read_metrics(storage, name, metadata) if not module else None,
        "epoch": epoch,
        "trainer": trainer,
        "arch_json": arch_json,
    }


def convert(
    src: str,
    dst: str,
    *,
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    architecture: Mapping[str, Any] | None = None,
    model_key: str = "model",
) -> str:
    """Rewrite a checkpoint in the format named by ``dst``'s extension (.safetensors or .pt), or a run into ``dst/``.

    Copies the weights, metrics, epoch, trainer state (a .pt training checkpoint's optimizer too) and
    the architecture record as they are: the architecture's class is never imported. A ``dst``
    ending in ``/`` is a run directory: every checkpoint of ``src`` (a directory) is written there
    under ckptio's names, as safetensors, so ``ls``, ``verify`` and a ``Checkpointer`` find them.
    A torch.distributed.checkpoint directory is streamed one tensor at a time (``ckptio.dcp.convert_dcp``:
    ``epoch``, ``architecture`` and ``model_key`` apply to it).
    """
    if is_dcp(src, storage_options):
        return convert_dcp(
            src, dst, epoch=epoch, architecture=architecture, model_key=model_key, storage_options=storage_options
        )
    if dst.endswith("/"):
        return _convert_run(src, dst, trusted, storage_options, epoch)
    if not dst.endswith(WEIGHT_EXTENSIONS):
        raise CheckpointFormatError(f"{dst}: destination must end in .safetensors or .pt, or be a directory (DIR/)")
    with typed_io(src, "reading"):
        storage, name = locate(src, storage_options)
        c = _converted(storage, name, trusted)
    directory, out_name = posixpath.split(dst)
    out = Storage(directory or ".", dict(storage_options or {}))
    try:
        return write_checkpoint(
            out, out_name, c["state"], architecture_json=c["arch_json"], epoch=c["epoch"],
            training_metrics=c["metrics"], trainer_state=c["trainer"],
        ).uri  # fmt: skip
    except (CheckpointFormatError, InvalidArgumentError):
        raise
    except Exception as e:
        raise save_failed(out.url(out_name), "converting " + src, e) from e


def _convert_run(
    src: str, dst: str, trusted: bool, storage_options: Mapping[str, Any] | None, epoch: int | None = None
) -> str:
    """Every checkpoint of directory ``src`` into run directory ``dst``, named as ckptio names them."""
    with typed_io(src, "listing"):
        storage, name = resolve(src, storage_options)
        if name is not None and not is_hf_name(name):
            raise CheckpointFormatError(f"{src}: converting into a directory takes a directory of checkpoints")
        infos = scan(storage) if name is None else list_checkpoints(src, storage_options)
    if not infos:
        raise CheckpointNotFoundError(f"{src}: no checkpoints in this directory")
    root = dst.rstrip("/")
    run = sanitize_run_name(posixpath.basename(root))  # the name a Checkpointer of dst resumes
    out = Storage(Storage(root, dict(storage_options or {})).url(CHECKPOINTS_DIR), dict(storage_options or {}))
    manifest_written = False
    for info in infos:
        with typed_io(info.uri, "reading"):
            c = _converted(storage, info.name, trusted)
        if c["epoch"] is None and info.legacy and is_hf_name(info.name):
            c["epoch"] = info.epoch if epoch is None else epoch  # a Hugging Face folder: the run's first epoch
        if c["epoch"] is None:
            raise CheckpointFormatError(f"{info.uri}: no epoch in its name or header to name the converted copy")
        target = checkpoint_of(out, run, c["epoch"], "safetensors")
        try:
            write_checkpoint(
                out, target.name, c["state"], architecture_json=c["arch_json"],
                epoch=c["epoch"], training_metrics=c["metrics"], trainer_state=c["trainer"],
            )  # fmt: skip
            if not manifest_written and c["arch_json"] is not None:
                write_manifest(out, c["arch_json"], __version__)  # write-once: one already there stays
                manifest_written = True
        except (CheckpointFormatError, InvalidArgumentError):
            raise
        except Exception as e:
            raise save_failed(target.uri, "converting " + info.uri, e) from e
    return out.url()


def inspect_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe a checkpoint without importing its architecture: format, epoch, tensors, bytes, metrics."""
    if uri.startswith("mock://"):
        return {
            "uri": uri, "format": "mock", "epoch": None, "tensor_count": 0, "total_bytes": 0, "dtypes": {},
            "metrics": None, "architecture": architecture_to_json(MockArchitecture()), "digest": None, "files": [],
        }  # fmt: skip
    if is_dcp(uri, storage_options):
        return describe_dcp(uri, storage_options)
    storage, name = locate(uri, storage_options)
    obj, metadata = read_weights(storage, name, mmap=None)
    tensors = state_dict_of(obj)
    record = architecture_record(storage, name, metadata)  # the manifest through its format check
    arch_raw = None if record is None else record[1]
    arch_raw = arch_raw.decode("utf-8", "replace") if isinstance(arch_raw, bytes) else arch_raw
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
        "format": format_of(name),
        "epoch": epoch_of(name, metadata),
        "tensor_count": len(tensors),
        "total_bytes": sum(t.numel() * t.element_size() for t in unique.values()),
        "dtypes": dtypes,
        "metrics": read_metrics(storage, name, metadata),
        "architecture": architecture,
        "digest": metadata.get("ckptio.crc32"),
        "weights_key": metadata.get("ckptio.pt_key"),  # a .pt training checkpoint: the entry the weights came from
        "files": [storage.url(n) for n in _files(storage, name, metadata) if storage.exists(n)],
    }  # fmt: skip


def _files(storage: Storage, name: str, metadata: Mapping[str, str]) -> list[str]:
    if is_hf_name(name):
        shards = shard_names(read_index(storage, name)) if name.endswith(HF_INDEX) else []
        return [HF_CONFIG, *shards, name]
    return [*Sidecars.of(name, metadata, name).names(), name]


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


def _verify_shards(storage: Storage, name: str) -> list[VerifyResult]:
    """A Hugging Face index and each shard it names: present, agreeing with it, and its digest where it has one."""
    uri = storage.url(name)
    try:
        weight_map = read_index(storage, name)
    except CheckpointError as e:
        return [VerifyResult(uri, "bad", _detail(e, uri))]
    shards = shard_names(weight_map)
    try:
        read_shards(storage, name, headers_only=True, weight_map=weight_map)
    except CheckpointError as e:
        # the message names the shard at fault (or the index itself): the verdict goes to that file
        culprit = next((storage.url(s) for s in shards if str(e).startswith(storage.url(s))), uri)
        return [VerifyResult(culprit, "bad", _detail(e, culprit))]
    results = [VerifyResult(uri, "ok", f"{len(weight_map)} tensors; every shard agrees with it")]
    return results + [_verify_weights(storage, shard)[0] for shard in shards]


def verify_checkpoint(storage: Storage, name: str) -> list[VerifyResult]:
    """Verify every file of one checkpoint: weights, metrics and trainer state, each against its digest."""
    if name.endswith(HF_INDEX):
        return _verify_shards(storage, name)
    weights, metadata = _verify_weights(storage, name)
    results = [weights]
    if metadata is None:
        return results
    sidecars = Sidecars.of(name, metadata, weights.uri, storage)
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
    """Fully verify a checkpoint file, or every checkpoint in a directory: one result per file.

    In a directory, weights files under names ckptio does not know (a copy, ``best.safetensors``) are
    verified too, and any other file that belongs to no checkpoint is reported, never skipped.
    """
    storage, name = resolve(uri, storage_options)
    if name is not None:
        return verify_checkpoint(storage, name)
    listing = storage.listdir()
    names = [i.name for i in scan(storage, listing)]
    known = set(names)
    sidecar = (TRAINER_SUFFIX, METRICS_SUFFIX)  # a trainer-state file ends in .safetensors too
    names += [
        n
        for n in listing
        if n.endswith(WEIGHT_EXTENSIONS) and not n.endswith(sidecar) and n not in known and not _hidden(n)
    ]
    if not names:
        raise CheckpointNotFoundError(f"{uri}: no checkpoints in this directory")
    results = [r for n in names for r in verify_checkpoint(storage, n)]
    covered = {posixpath.basename(r.uri) for r in results} | {MANIFEST_NAME}
    covered |= {other for n in names for other in files_of(n, listing)}  # replaced saves' files
    for other in sorted(set(listing) - covered):
        if not _hidden(other) and "/" not in other and storage.kind(other) != "directory":
            what = ORPHAN if other.endswith(sidecar) else "not a file of any checkpoint here; not checked"
            results.append(VerifyResult(storage.url(other), "unverified", what))
    return results


# sidecars are written before the weights file commits a save: a writer stopped in between leaves them
ORPHAN = "sidecar of a save that never committed (its writer stopped before the weights); part of no checkpoint"


def _hidden(name: str) -> bool:
    return is_temporary(name) or posixpath.basename(name).startswith(".")
