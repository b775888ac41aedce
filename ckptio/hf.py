"""Hugging Face model folders: what ``save_pretrained`` writes, read as a checkpoint, and written from one.

A folder holds ``model.safetensors``, or shards named by ``model.safetensors.index.json`` (its
``weight_map`` gives each tensor's shard), beside ``config.json``. Reading checks every shard against
the index; writing streams one tensor at a time, so memory stays at the largest tensor.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch

from .architecture import TRANSFORMERS_CONFIG_CLASS
from .errors import CheckpointFormatError, CheckpointNotFoundError, CorruptCheckpointError, InvalidArgumentError
from .formats import LazyTensor, file_size, read_header, read_safetensors, verify_safetensors, write_safetensors
from .storage import Storage

__all__ = [
    "HF_CONFIG",
    "HF_INDEX",
    "HF_WEIGHTS",
    "HFShards",
    "config_architecture",
    "hf_name",
    "is_hf_name",
    "parse_size",
    "read_config",
    "read_index",
    "read_shards",
    "shard_names",
    "write_hf",
]

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_CONFIG = "config.json"
_SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
_EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_hf_name(name: str) -> bool:
    """Whether ``name`` is an HF folder's weights entry: ``model.safetensors`` or the shard index."""
    return posixpath.basename(name) in (HF_WEIGHTS, HF_INDEX)


def hf_name(listing: list[str]) -> str | None:
    """The weights entry of a folder that ``save_pretrained`` wrote (the index wins), None for any other folder."""
    for name in (HF_INDEX, HF_WEIGHTS):
        if name in listing:
            return name
    return None


def read_index(storage: Storage, name: str = HF_INDEX) -> dict[str, str]:
    """The index's ``weight_map`` (tensor -> shard file), checked for shape: CorruptCheckpointError naming it."""
    source = storage.url(name)
    try:
        doc = json.loads(storage.read_bytes(name))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{source}: no such file") from None
    except ValueError as e:
        raise CorruptCheckpointError(f"{source}: not valid JSON: {e}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{source}: no 'weight_map' object naming each tensor's shard")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or "/" in v or not v.endswith(".safetensors")]
    if bad:
        raise CorruptCheckpointError(
            f"{source}: weight_map entry {bad[0]!r} names {weight_map[bad[0]]!r}, not a .safetensors file beside it"
        )
    return dict(weight_map)


def shard_names(weight_map: Mapping[str, str]) -> list[str]:
    """The shard files an index names, in the order they first appear."""
    return list(dict.fromkeys(weight_map.values()))


class HFShards(Mapping[str, torch.Tensor]):
    """One state dict over several mapped shard files: a tensor is made when first asked for."""

    def __init__(self, parts: Mapping[str, Mapping[str, torch.Tensor]], weight_map: Mapping[str, str]):
        self._parts, self._map = parts, weight_map

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._parts[self._map[key]][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        return key in self._map


def _check_shard(source: str, keys: Any, expected: set[str], weight_map: Mapping[str, str]) -> None:
    held = set(keys)
    extra, lacking = sorted(held - expected), sorted(expected - held)
    if lacking:
        raise CorruptCheckpointError(
            f"{source}: lacks tensor {lacking[0]!r} that the index maps to it ({len(lacking)} missing): the shard "
            "and model.safetensors.index.json disagree"
        )
    if extra:
        elsewhere = weight_map.get(extra[0])
        raise CorruptCheckpointError(
            f"{source}: holds tensor {extra[0]!r}, which the index maps to "
            f"{repr(elsewhere) if elsewhere else 'no shard'} ({len(extra)} such): the shard and "
            "model.safetensors.index.json disagree"
        )


def read_shards(
    storage: Storage,
    name: str = HF_INDEX,
    *,
    mmap: bool = True,
    headers_only: bool = False,
    verify: bool = False,
    cache: Any = None,
    weight_map: Mapping[str, str] | None = None,
) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """The tensors of every shard the index names, each shard checked against it (a missing shard, a tensor in
    the wrong shard or in none is CorruptCheckpointError naming the file). ``headers_only``: the check alone.
    A remote folder's shards are mapped from the node ``cache`` (a ``NodeCache``) where one is given;
    ``weight_map``: the index, where the caller has read it already."""
    weight_map = read_index(storage, name) if weight_map is None else weight_map
    wanted: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        wanted.setdefault(shard, set()).add(key)
    parts: dict[str, Mapping[str, torch.Tensor]] = {}
    listing = set(storage.listdir())
    for shard, keys in wanted.items():
        source = storage.url(shard)
        if shard not in listing:
            raise CorruptCheckpointError(
                f"{storage.url(name)}: names shard {shard!r} ({len(keys)} tensors), which is missing: {source}"
            )
        path = storage.local_path(shard)
        if path is None and cache is not None and not headers_only:
            path = cache.fetch(storage, shard)
        with open(path, "rb") if path is not None else storage.open(shard, "rb") as f:
            if headers_only:
                _check_shard(source, read_header(f, file_size(f), source).entries, keys, weight_map)
                continue
            if verify:
                verify_safetensors(f, source)
            tensors, _ = read_safetensors(f, source, mmap_file=mmap and path is not None)
        _check_shard(source, tensors.keys(), keys, weight_map)
        parts[shard] = tensors
    return HFShards(parts, weight_map), {"format": "pt"}


def read_config(storage: Storage) -> dict[str, Any] | None:
    """The folder's ``config.json`` (None when absent); one without ``model_type`` is CheckpointFormatError."""
    try:
        raw = storage.read_bytes(HF_CONFIG)
    except FileNotFoundError:
        return None
    source = storage.url(HF_CONFIG)
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise CorruptCheckpointError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise CheckpointFormatError(
            f"{source}: has no 'model_type', so no transformers config class can be chosen for it (AutoConfig "
            "reads it); add it, or pass the architecture yourself"
        )
    return config


def config_architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture record of a transformers config: built (through the allow-list) by AutoConfig."""
    return {"class_path": TRANSFORMERS_CONFIG_CLASS, "config": dict(config)}


def parse_size(size: int | str) -> int:
    """Bytes from ``5000000``, ``"5GB"`` (10^9) or ``"5GiB"`` (2^30), as transformers' ``max_shard_size`` reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size > 0:
            return size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
        if m:
            unit = (m[2] or "B").upper()
            scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
            n = int(float(m[1]) * scale)
            if n > 0:
                return n
    raise InvalidArgumentError(
        f"max_shard_size must be a positive byte count like 5000000, '500MB' or '2GiB': {size!r}"
    )


def export_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _EXPORT_DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {sorted(_EXPORT_DTYPES)}, got {name!r}")
    return _EXPORT_DTYPES[name]


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the source file
    end: int


class _Source:
    """A safetensors file read one tensor at a time (a plain read, not a mapping: memory holds one tensor)."""

    def __init__(self, f: IO[bytes], source: str):
        self.f, self.source = f, source
        hdr = read_header(f, file_size(f), source)
        self.metadata = hdr.metadata
        self.entries = {
            k: _Entry(d, s, hdr.data_start + b, hdr.data_start + e) for k, (d, s, b, e) in hdr.entries.items()
        }

    def read(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        self.f.seek(e.begin)
        buf = bytearray(e.end - e.begin)
        if self.f.readinto(buf) != len(buf):  # type: ignore[attr-defined]
            raise CorruptCheckpointError(f"{self.source}: file shrank while tensor {key!r} was read")
        if not buf:
            return torch.empty(e.shape, dtype=e.dtype)
        return torch.frombuffer(buf, dtype=e.dtype).view(e.shape)


def _shards(sizes: list[tuple[str, int]], limit: int | None) -> list[list[str]]:
    """Tensors grouped into shards in order, a shard closed before it would pass ``limit`` (as transformers does)."""
    groups: list[list[str]] = [[]]
    used = 0
    for key, n in sizes:
        if limit is not None and groups[-1] and used + n > limit:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += n
    return groups


def write_hf(
    src: Storage,
    name: str,
    out: Storage,
    *,
    config: Mapping[str, Any] | None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
) -> list[str]:
    """Write ``src``'s weights file ``name`` into ``out`` as ``from_pretrained`` loads it; returns the names written.

    Ties are stored once, under the first name (transformers leaves out the names its ``_tied_weights_keys``
    ties, and restores them at load); floating tensors are cast to ``dtype``. The index (or the single file) is
    written last: a folder interrupted before it holds no model ``from_pretrained`` would load.
    """
    target_dtype = export_dtype(dtype)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    path = src.local_path(name)
    with open(path, "rb") if path is not None else src.open(name, "rb") as f:
        source = _Source(f, src.url(name))
        aliases = json.loads(source.metadata.get("ckptio.aliases") or "{}")

        def cast(key: str) -> torch.dtype:
            d = source.entries[key].dtype
            return target_dtype if target_dtype is not None and d.is_floating_point else d

        keys = [k for k in source.entries if k not in aliases]
        sizes = [(k, cast(k).itemsize * int(torch.Size(source.entries[k].shape).numel())) for k in keys]
        groups = _shards(sizes, limit)
        names = (
            [HF_WEIGHTS]
            if len(groups) == 1
            else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        )
        written: list[str] = []
        if config is not None:
            doc = dict(config)
            if target_dtype is not None:
                doc["dtype"] = dtype
                doc.pop("torch_dtype", None)
            written.append(out.write(HF_CONFIG, lambda w: w.write(json.dumps(doc, indent=2, sort_keys=True).encode())))

        def lazy(key: str) -> LazyTensor:
            return LazyTensor(cast(key), source.entries[key].shape, lambda: source.read(key).to(cast(key)))

        for shard, group in zip(names, groups, strict=True):
            written.append(
                out.write(shard, lambda w, g=group: write_safetensors(w, {k: lazy(k) for k in g}, {"format": "pt"}))
            )
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": sum(n for _, n in sizes)},
                "weight_map": {k: shard for shard, group in zip(names, groups, strict=True) for k in group},
            }
            written.append(out.write(HF_INDEX, lambda w: w.write(json.dumps(index, indent=2).encode())))
    return written
