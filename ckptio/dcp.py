"""torch.distributed.checkpoint (DCP) checkpoints: described, and converted into one standard file or a run.

A DCP checkpoint is a directory of per-rank ``.distcp`` files and a ``.metadata`` file: torch's
``Metadata``, pickled, which names every flattened key (``model.<fqn>``, ``optimizer.state.<fqn>.<k>``,
``optimizer.param_groups.<i>.<k>``, ...), each tensor's chunks, and where each chunk's bytes lie. Torch's
own readers unpickle the metadata, and the non-tensor entries, with full trust; here the metadata is
unpickled with an allow-list of DCP's own classes, and the entries with ``weights_only``, so a DCP
checkpoint from elsewhere runs no code. Tensors are then read one at a time, chunk by chunk (each
chunk is a tensor ``torch.save`` wrote: a weights-only ``torch.load`` of its byte range), straight into
ckptio's writer: a conversion holds about one tensor, never the model.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import posixpath
from collections.abc import Mapping
from typing import Any

import torch

from .errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointSecurityError,
    CorruptCheckpointError,
    save_failed,
    typed_io,
)
from .formats import LazyTensor
from .layout import CHECKPOINTS_DIR, checkpoint_of, sanitize_run_name, write_checkpoint, write_manifest
from .storage import Storage
from .trainer_state import flatten
from .version import __version__

__all__ = ["METADATA_NAME", "convert_dcp", "describe_dcp", "is_dcp"]

METADATA_NAME = ".metadata"
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # TensorProperties.layout, by name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: DCP's own classes, torch sizes and dtypes, paths."""

    def __init__(self, f: Any, source: str):
        super().__init__(f)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointSecurityError(
            f"{self.source}: names {module}.{name}, which DCP's metadata never holds; refusing to unpickle it"
        )


def is_dcp(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when ``uri`` is a directory holding a DCP ``.metadata`` file."""
    storage = Storage(uri.rstrip("/") or "/", dict(storage_options or {}))
    return storage.kind(METADATA_NAME) == "file"


class _Checkpoint:
    """One DCP checkpoint: its metadata, checked, and the reading of one entry at a time."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None):
        self.storage = Storage(uri.rstrip("/") or "/", dict(storage_options or {}))
        self.uri = self.storage.url()
        source = self.storage.url(METADATA_NAME)
        with typed_io(source, "reading DCP metadata"):
            raw = self.storage.read_bytes(METADATA_NAME)
        try:
            self.metadata = _MetadataUnpickler(io.BytesIO(raw), source).load()
        except CheckpointSecurityError:
            raise
        except Exception as e:  # a truncated or damaged pickle raises any of a dozen types
            raise CorruptCheckpointError(f"{source}: not a DCP metadata file: {type(e).__name__}: {e}") from None
        entries = getattr(self.metadata, "state_dict_metadata", None)
        self.where = getattr(self.metadata, "storage_data", None)
        if not isinstance(entries, dict) or not isinstance(self.where, dict):
            raise CorruptCheckpointError(f"{source}: not a DCP metadata file (no state_dict_metadata/storage_data)")
        self.entries: dict[str, Any] = entries
        self._open: dict[str, int] = {}  # local .distcp files' descriptors, by path
        self._check_files()
        self._check_chunks(source)

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def _check_files(self) -> None:
        """Every file the metadata points into exists and is long enough: found before anything is written."""
        needed: dict[str, int] = {}
        for info in self.where.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(needed.items()):
            try:
                size = self.storage.info(name).size
            except CheckpointNotFoundError:
                raise CheckpointNotFoundError(
                    f"{self.storage.url(name)}: missing (the DCP metadata names it)"
                ) from None
            if size < end:
                raise CorruptCheckpointError(
                    f"{self.storage.url(name)}: truncated: {size} bytes, the DCP metadata reads up to byte {end}"
                )

    def _check_chunks(self, source: str) -> None:
        """Every tensor's chunks lie inside it, do not overlap, and cover it."""
        for key, entry in self.entries.items():
            if not hasattr(entry, "chunks"):
                continue
            size = tuple(entry.size)
            boxes = []
            for c in entry.chunks:
                offsets, sizes = tuple(c.offsets), tuple(c.sizes)
                if not len(offsets) == len(sizes) == len(size) or any(
                    o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, size, strict=True)
                ):
                    raise CorruptCheckpointError(f"{source}: a chunk of {key!r} lies outside its shape {list(size)}")
                boxes.append(tuple(zip(offsets, sizes, strict=True)))
            for i, a in enumerate(boxes):
                for b in boxes[i + 1 :]:
                    if all(max(oa, ob) < min(oa + na, ob + nb) for (oa, na), (ob, nb) in zip(a, b, strict=True)):
                        raise CorruptCheckpointError(f"{source}: chunks of {key!r} overlap")
            numel = math.prod(size)
            covered = sum(math.prod(n for _, n in box) for box in boxes)
            if covered != numel:
                raise CorruptCheckpointError(f"{source}: the chunks of {key!r} cover {covered} of its {numel} elements")

    def _read_item(self, index: Any) -> bytes:
        info = self.where.get(index)
        if info is None:
            raise CorruptCheckpointError(f"{self.uri}: the DCP metadata does not say where {index.fqn!r} is stored")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointFormatError(
                f"{self.storage.url(info.relative_path)}: {index.fqn!r} is stored transformed "
                f"({info.transform_descriptors}); ckptio reads untransformed DCP checkpoints"
            )
        with typed_io(self.storage.url(info.relative_path), "reading"):
            path = self.storage.local_path(info.relative_path)
            if path is None:  # a store: one ranged request
                data = self.storage.read_range(info.relative_path, info.offset, info.offset + info.length)
            else:  # a local file, kept open: an item is one pread
                fd = self._open.get(path)
                if fd is None:
                    fd = self._open[path] = os.open(path, os.O_RDONLY)
                data = os.pread(fd, info.length, info.offset)
        if len(data) != info.length:
            raise CorruptCheckpointError(f"{self.storage.url(info.relative_path)}: truncated while read")
        return data

    def _load(self, data: bytes, what: str, source: str) -> Any:
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # damaged bytes, or an object outside weights-only unpickling
            raise CorruptCheckpointError(f"{source}: {what}: cannot be read with weights_only: {e}") from None

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor ``key``, read chunk by chunk (one chunk read at a time beside it)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        entry = self.entries[key]
        size, dtype = tuple(entry.size), entry.properties.dtype
        out: torch.Tensor | None = None
        for c in entry.chunks:
            index = MetadataIndex(key, torch.Size(c.offsets))
            info = self.where.get(index)
            source = self.storage.url(info.relative_path) if info is not None else self.uri
            chunk = self._load(self._read_item(index), f"a chunk of {key!r}", source)
            if not isinstance(chunk, torch.Tensor) or tuple(chunk.shape) != tuple(c.sizes) or chunk.dtype != dtype:
                raise CorruptCheckpointError(f"{source}: a chunk of {key!r} is not the tensor its metadata describes")
            if tuple(c.sizes) == size:
                return chunk  # the whole tensor in one chunk: no copy
            if out is None:
                out = torch.empty(size, dtype=dtype)
            view = out
            for dim, (o, n) in enumerate(zip(c.offsets, c.sizes, strict=True)):
                view = view.narrow(dim, o, n)
            view.copy_(chunk)
            del chunk
        assert out is not None or not size or 0 in size
        return out if out is not None else torch.empty(size, dtype=dtype)

    def value(self, key: str) -> Any:
        """A non-tensor entry (a JSON-like value, saved by torch.save), unpickled with weights_only."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        index = MetadataIndex(key)
        info = self.where.get(index)
        source = self.storage.url(info.relative_path) if info is not None else self.uri
        return self._load(self._read_item(index), f"entry {key!r}", source)


def _is_tensor(entry: Any) -> bool:
    return hasattr(entry, "chunks")


def describe_dcp(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a DCP checkpoint holds, without reading its tensors: keys, shapes, dtypes, bytes."""
    ckpt = _Checkpoint(uri, storage_options)
    tensors, others, total = {}, [], 0
    for key, entry in ckpt.entries.items():
        if _is_tensor(entry):
            nbytes = math.prod(entry.size) * entry.properties.dtype.itemsize
            total += nbytes
            tensors[key] = {"dtype": str(entry.properties.dtype).removeprefix("torch."), "shape": list(entry.size),
                            "bytes": nbytes, "chunks": len(entry.chunks)}  # fmt: skip
        else:
            others.append(key)
    files = sorted({info.relative_path for info in ckpt.where.values()})
    return {
        "uri": ckpt.uri, "format": "dcp", "top_level_keys": sorted({k.split(".", 1)[0] for k in ckpt.entries}),
        "tensor_count": len(tensors), "total_bytes": total, "tensors": tensors, "values": sorted(others),
        "files": [METADATA_NAME, *files],
    }  # fmt: skip


def _lazy(ckpt: _Checkpoint, key: str) -> LazyTensor:
    entry = ckpt.entries[key]
    return LazyTensor(entry.properties.dtype, tuple(entry.size), lambda: ckpt.tensor(key))


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _split(ckpt: _Checkpoint, model_key: str, optimizer_key: str) -> tuple[dict, dict, dict]:
    """(weights, optimizer, the rest) of a DCP checkpoint's flattened keys, tensors as lazy ones."""
    weights: dict[str, Any] = {}
    optimizer: dict[str, Any] = {"state": {}, "param_groups": {}}
    rest: dict[str, Any] = {}
    for key, entry in ckpt.entries.items():
        top, _, inner = key.partition(".")
        if top == model_key:
            if not _is_tensor(entry):
                raise CheckpointFormatError(f"{ckpt.uri}: model entry {key!r} is not a tensor")
            weights[inner] = _lazy(ckpt, key)
        elif top == optimizer_key and inner.startswith("state."):
            fqn, _, name = inner.removeprefix("state.").rpartition(".")
            value = _lazy(ckpt, key) if _is_tensor(entry) else ckpt.value(key)
            optimizer["state"].setdefault(fqn, {})[name] = value
        elif top == optimizer_key and inner.startswith("param_groups."):
            group, _, name = inner.removeprefix("param_groups.").partition(".")
            optimizer["param_groups"].setdefault(int(group), {})[name] = ckpt.value(key)
        else:  # lr_scheduler, train_state, dataloader...: the user's part of the trainer state
            _set(rest, key.split("."), _lazy(ckpt, key) if _is_tensor(entry) else ckpt.value(key))
    if optimizer["param_groups"]:
        optimizer["param_groups"] = [optimizer["param_groups"][i] for i in sorted(optimizer["param_groups"])]
    else:
        optimizer = {}
    return weights, optimizer, rest


def _step_of(rest: Mapping[str, Any]) -> int | None:
    """The state's own step or epoch (``train_state.step`` as torchtitan saves it), if one is there."""
    for section in rest.values():
        if isinstance(section, Mapping):
            for name in ("epoch", "step"):
                value = section.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    return value
    return None


def convert_dcp(
    src: str,
    dst: str,
    *,
    epoch: int | None = None,
    architecture: Mapping[str, Any] | None = None,
    model_key: str = "model",
    optimizer_key: str = "optimizer",
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Convert the DCP checkpoint ``src`` into one standard file ``dst`` (``.safetensors``) or a checkpoint of run
    directory ``dst/``, streamed one tensor at a time.

    The ``model_key`` entries become the weights (names as ``get_model_state_dict`` gives them); the optimizer's
    go to the trainer state keyed by parameter name, as ``Checkpointer.save(optimizer=)`` stores them; every other
    entry (scheduler, train state, data loader) to the trainer state's user part. ``epoch``: else the state's own
    step, else 0. ``architecture`` (``{"class_path", "config"}``) goes into the header and the run's manifest.
    Nothing is written unless every file the metadata names is there and whole; the output appears by rename.
    """
    ckpt = _Checkpoint(src, storage_options)
    try:
        return _convert(ckpt, dst, epoch, architecture, model_key, optimizer_key, storage_options)
    finally:
        ckpt.close()


def _convert(
    ckpt: _Checkpoint,
    dst: str,
    epoch: int | None,
    architecture: Mapping[str, Any] | None,
    model_key: str,
    optimizer_key: str,
    storage_options: Mapping[str, Any] | None,
) -> str:
    weights, optimizer, rest = _split(ckpt, model_key, optimizer_key)
    if not weights:
        found = sorted({k.split(".", 1)[0] for k in ckpt.entries})
        raise CheckpointFormatError(
            f"{ckpt.uri}: no entries under {model_key!r}; top-level keys found: {', '.join(found) or 'none'}; name "
            "the model's with model_key= (ckptio convert --model-key KEY)"
        )
    epoch = epoch if epoch is not None else (_step_of(rest) or 0)
    tree: dict[str, Any] = {"user": rest or None, "epoch": epoch, "rng": []}
    if optimizer:
        tree["optimizer"] = optimizer
    trainer = flatten(tree)
    arch_json = dict(architecture) if architecture is not None else None
    if dst.endswith("/"):
        root = dst.rstrip("/")
        out = Storage(
            Storage(root or "/", dict(storage_options or {})).url(CHECKPOINTS_DIR), dict(storage_options or {})
        )
        name = checkpoint_of(out, sanitize_run_name(posixpath.basename(root)), epoch, "safetensors").name
    elif dst.endswith(".safetensors"):
        directory, name = posixpath.split(dst)
        out = Storage(directory or ".", dict(storage_options or {}))
    else:
        raise CheckpointFormatError(
            f"{dst}: a DCP checkpoint converts to a .safetensors file or a run directory (DIR/)"
        )
    if out.exists(name):
        raise CheckpointFormatError(f"{out.url(name)}: exists; converting never overwrites a checkpoint")
    before = set(out.listdir())
    try:
        saved = write_checkpoint(out, name, weights, architecture_json=arch_json, epoch=epoch, trainer_state=trainer)
        if dst.endswith("/") and arch_json is not None:
            write_manifest(out, arch_json, __version__)  # write-once: one already there stays
    except Exception as e:
        for stray in set(out.listdir()) - before:  # a sidecar committed before the weights failed
            out.delete(stray)
        if isinstance(e, (CheckpointFormatError, CorruptCheckpointError, CheckpointSecurityError)):
            raise
        raise save_failed(out.url(name), "converting " + ckpt.uri, e) from e
    return saved.uri


def architecture_arg(text: str) -> dict[str, Any]:
    """``--architecture``: a JSON ``{"class_path": ..., "config": {...}}``, or a bare class path (no config)."""
    text = text.strip()
    if text.startswith("{"):
        doc = json.loads(text)
        if not isinstance(doc, dict) or "class_path" not in doc:
            raise CheckpointFormatError(f"--architecture {text[:80]!r}: a JSON object with a class_path")
        return {"class_path": doc["class_path"], "config": doc.get("config", {})}
    return {"class_path": text, "config": {}}
