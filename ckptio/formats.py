"""Byte formats: a streaming safetensors writer, a validating memory-mapped reader, legacy .pt.

The safetensors files written here are standard (stock ``safetensors.safe_open`` reads them).
ckptio's additions live in the header's ``__metadata__`` (string to string):

- ``ckptio.format``: format version; ``ckptio.architecture``: ``{"class_path", "config"}`` JSON;
  ``ckptio.epoch``; ``ckptio.partial``: "1" when the weights are a subset of the model's (``save(only=)``);
  ``ckptio.aliases``: ``{alias: stored_key}`` for tied tensors stored once;
- ``ckptio.crc32`` and ``ckptio.data_bytes``: a CRC-32 of the data section, computed while
  streaming it out, and its length;
- ``ckptio.chunk_bytes`` and ``ckptio.chunk_crc32``: the CRC-32 of each chunk of the data section
  (8 hex digits each, in order), computed in the same pass, so that a reader holding only some byte
  ranges of the file can check them.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import io
import itertools
import json
import logging
import math
import mmap
import os
import pickle
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch

try:  # ISA-L's CRC-32: the same digest as zlib's, about 6x faster (0.08 s against 0.48 s per GiB here)
    from isal.isal_zlib import crc32
except ImportError:  # platforms without an isal wheel
    from zlib import crc32

from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointSecurityError,
    CorruptCheckpointError,
)
from .storage import covers, merge_ranges, write_all
from .version import __version__

__all__ = [
    "FORMAT_VERSION",
    "check_format_version",
    "SafetensorsHeader",
    "WRITER_KEYS",
    "alias_key",
    "ChunkDigests",
    "PartialTensors",
    "StoredTensor",
    "block_ranges",
    "check_digest",
    "chunk_digests",
    "crc32_hex",
    "file_size",
    "load_pt",
    "load_pt_object",
    "pt_weights_key",
    "read_header",
    "read_safetensors",
    "save_pt",
    "verify_safetensors",
    "write_safetensors",
]

# The checkpoint format: headers carry it as ``ckptio.format``, run manifests as ``ckptio_format``. It goes up
# when an older ckptio would misread a file of the new layout or read it incompletely without noticing (a new file
# a checkpoint cannot do without, a key whose meaning changes, sidecars found another way); additions an older
# reader safely ignores (a new optional key) keep it. Every older format keeps loading; a newer one is refused.
FORMAT_VERSION = "1"


def check_format_version(value: Any, source: str) -> None:
    """CheckpointFormatError unless ``value`` (a file's format number) is one this ckptio reads."""
    text = str(value)
    if not text.isdigit():
        raise CorruptCheckpointError(f"{source}: invalid ckptio format number {text[:40]!r}")
    if int(text) > int(FORMAT_VERSION):
        raise CheckpointFormatError(
            f"{source}: written in ckptio checkpoint format {text} by a newer ckptio; this ckptio ({__version__}) "
            f"reads format {FORMAT_VERSION} and older: upgrade ckptio (pip install --upgrade ckptio)"
        )


MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's bound, to the byte
_CHUNK = 64 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
        ("BOOL", "bool"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"),
    ]
    if hasattr(torch, attr)
}  # fmt: skip
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
log = logging.getLogger("ckptio")
# Valid safetensors dtypes whose elements are smaller than a byte: the reference packs them into
# torch dtypes of another shape; ckptio refuses them by name rather than calling the file corrupt.
_UNSUPPORTED_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
# Written by write_safetensors itself: a caller's metadata may not set them.
WRITER_KEYS = frozenset(
    {"ckptio.crc32", "ckptio.chunk_crc32", "ckptio.chunk_bytes", "ckptio.data_bytes", "ckptio.format", "ckptio.aliases"}
)
MIN_CHUNK_BYTES = 16 * 1024
MAX_CHUNKS = 65536
_INT64_MAX = 2**63 - 1
_U64_LIMIT = 2**64
_ITEMSIZE = {name: dtype.itemsize for name, dtype in _DTYPES.items()}


def crc32_hex(data: bytes | memoryview) -> str:
    """The CRC-32 ckptio records for a file's bytes, as 8 hex digits."""
    return f"{crc32(data):08x}"


def _dtype_name(t: torch.Tensor, key: str) -> str:
    try:
        return _NAMES[t.dtype]
    except KeyError:
        raise CheckpointFormatError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store") from None


# --------------------------------------------------------------------------------------------
# writing


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without copying (t must be dense, contiguous and on the CPU)."""
    if t.numel() == 0:
        return memoryview(b"")
    # as_strided, not reshape: a 1-element view keeps its odd stride through reshape, and view() refuses it
    return memoryview(t.as_strided((t.numel(),), (1,)).view(torch.uint8).numpy())


def alias_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors one (tied weights): the same memory viewed the same way; None if it has none."""
    if (
        t.numel() == 0
        or t.layout != torch.strided
        or t.is_meta
        or hasattr(t, "to_local")
        or t.untyped_storage().data_ptr() == 0
    ):
        return None
    # conj/neg bits are part of identity: x and x.conj() share memory but are not the same tensor
    return (
        t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device,
        t.is_conj(), t.is_neg(),
    )  # fmt: skip


def _dense_cpu(t: torch.Tensor, key: str, detach: bool) -> torch.Tensor:
    """A CPU tensor whose memory holds exactly its elements in row-major order."""
    if t.layout != torch.strided:
        raise CheckpointFormatError(f"tensor {key!r} has layout {t.layout}; only dense tensors can be saved")
    if t.is_meta:
        raise CheckpointFormatError(f"tensor {key!r} is on the meta device and has no data to save")
    if hasattr(t, "to_local"):  # DTensor: its local storage is one shard, not the tensor
        raise CheckpointFormatError(
            f"tensor {key!r} is a {type(t).__name__} (sharded); gather a full state dict before saving it"
        )
    if t.requires_grad and not detach:
        raise CheckpointFormatError(f"tensor {key!r} requires grad; save with detach_buffers=True")
    t = t.detach().to("cpu").resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


class LazyTensor:
    """A tensor known by dtype and shape now, whose bytes ``materialize()`` produces when the writer reaches it.

    The header of a file is laid out before any data is written, so a sharded tensor can be gathered
    one at a time while the file streams out: the writer holds one such tensor at a time.
    """

    def __init__(
        self, dtype: torch.dtype, shape: tuple[int, ...], materialize: Callable[[], torch.Tensor], *, ahead: int = 0
    ):
        self.dtype, self.shape, self._materialize = dtype, tuple(shape), materialize
        # how many later lazy tensors the writer may materialize while this one's bytes are written
        self.ahead = ahead

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def materialize(self, key: str) -> torch.Tensor | list[torch.Tensor]:
        """The tensor, or consecutive pieces of it (blocks along its first dimension) whose bytes follow each other."""
        t = self._materialize()
        if isinstance(t, (list, tuple)):
            if any(p.dtype != self.dtype for p in t) or sum(p.numel() for p in t) != self.numel():
                raise CheckpointFormatError(
                    f"tensor {key!r} materialized as pieces of {sum(p.numel() for p in t)} elements, header says "
                    f"{self.dtype}{list(self.shape)}"
                )
            return [_dense_cpu(p, key, detach=True) for p in t]
        if t.dtype != self.dtype or tuple(t.shape) != self.shape:
            raise CheckpointFormatError(
                f"tensor {key!r} materialized as {t.dtype}{list(t.shape)}, header says {self.dtype}{list(self.shape)}"
            )
        return _dense_cpu(t, key, detach=True)


def data_order(tensors: Mapping[str, Any]) -> list[str]:
    """The order tensors' bytes are written in: by decreasing element size, else as given (stable)."""
    return sorted(tensors, key=lambda k: -tensors[k].element_size())


def _prepare(
    tensors: Mapping[str, torch.Tensor | LazyTensor], detach: bool
) -> tuple[dict[str, torch.Tensor | LazyTensor], dict[str, str]]:
    """CPU, contiguous tensors with exact aliases (tied weights) reduced to one stored key."""
    stored: dict[str, torch.Tensor | LazyTensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"state dict key {key!r} is not a string")
        if isinstance(t, LazyTensor):  # one lazy tensor under several keys: a tie, found by the sharded save
            _dtype_name(t, key)
            if ("lazy", id(t)) in seen:
                aliases[key] = seen[("lazy", id(t))]
                continue
            seen[("lazy", id(t))] = key
            stored[key] = t
            continue
        if not isinstance(t, torch.Tensor):
            raise CheckpointFormatError(f"state dict value {key!r} is a {type(t).__name__}, not a tensor")
        if key == "__metadata__":
            raise CheckpointFormatError("'__metadata__' is reserved by safetensors and cannot be a tensor name")
        _dtype_name(t, key)
        ak = alias_key(t)
        if ak is not None:
            if ak in seen:
                aliases[key] = seen[ak]
                continue
            seen[ak] = key
        stored[key] = _dense_cpu(t, key, detach)
    return stored, aliases


class _Digest:
    """CRC-32s of a data section as it streams out: the whole section's, and each chunk's.

    Chunks start at ``starts`` (see ``chunk_starts``: each tensor's bytes in chunks of its own).
    The chunk digests let a reader that fetched only part of a file prove what it holds (a resume
    on several nodes reads each node's ranges, not the whole file).
    """

    def __init__(self, starts: list[int]):
        self.whole = 0
        self.chunks: list[int] = []
        self._bounds = starts[1:]  # where the chunk being filled ends, then the next ones
        self._pos, self._crc, self._filled = 0, 0, False

    def update(self, view: memoryview) -> None:
        self.whole = crc32(view, self.whole)
        while len(view):
            end = self._bounds[len(self.chunks)] if len(self.chunks) < len(self._bounds) else math.inf
            take = int(min(len(view), end - self._pos))
            self._crc = crc32(view[:take], self._crc)
            self._pos += take
            self._filled = True
            view = view[take:]
            if self._pos == end:
                self.chunks.append(self._crc)
                self._crc, self._filled = 0, False

    def finish(self) -> tuple[str, str]:
        """(the whole section's digest, the chunks' digests), as the header stores them."""
        if self._filled:
            self.chunks.append(self._crc)
            self._crc, self._filled = 0, False
        return f"{self.whole:08x}", "".join(f"{c:08x}" for c in self.chunks)


class _Checksum:
    """The digests of chunks on a second thread while the caller writes them.

    The digest is one more pass over the data; it and write(2) both release the GIL, so on two
    cores it runs beside the writes rather than after them. The chunks must not change meanwhile.
    """

    def __init__(self, chunks: list[memoryview], starts: list[int]):
        self._digest = _Digest(starts)
        self._thread = threading.Thread(target=self._run, args=(chunks,), name="ckptio-crc32", daemon=True)
        self._thread.start()

    def _run(self, chunks: list[memoryview]) -> None:
        for chunk in chunks:
            self._digest.update(chunk)

    def result(self) -> tuple[str, str]:
        self._thread.join()
        return self._digest.finish()


def chunk_bytes_for(data_bytes: int) -> int:
    """The chunk a file's data is digested in: 16 KiB, doubled until about 65536 chunks cover it.

    Small enough that a partial read rounds out by little, few enough that the header stays small.
    """
    size = MIN_CHUNK_BYTES
    while data_bytes > size * MAX_CHUNKS:
        size *= 2
    return size


def chunk_starts(spans: Iterable[tuple[int, int]], chunk_bytes: int) -> list[int]:
    """Where each digested chunk starts in the data section: every tensor's bytes ``(begin, end)``, in file order,
    cut into chunks of ``chunk_bytes`` from its own first byte (so a block of one tensor never rounds out into
    its neighbours)."""
    return [p for begin, end in spans for p in range(begin, end, chunk_bytes)]


_DIGEST_PREFIX = b'{"__metadata__":{"ckptio.crc32":"'
_CHUNKS_INFIX = b'","ckptio.chunk_crc32":"'


def write_safetensors(
    f: IO[bytes],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    detach: bool = True,
) -> None:
    """Stream a safetensors file into ``f``: header, then each tensor's bytes straight from memory.

    Tensors are laid out by decreasing element size (header keys keep state-dict order), so every
    tensor starts aligned for its dtype and can be memory-mapped without a copy. ``LazyTensor``
    values are materialized one at a time, in ``data_order``, as the writer reaches them.
    """
    if not f.seekable():
        with tempfile.TemporaryFile() as spool:  # the digest goes into the header, after the data
            write_safetensors(spool, tensors, metadata, detach=detach)
            spool.seek(0)
            shutil.copyfileobj(spool, f, _CHUNK)
        return
    stored, aliases = _prepare(tensors, detach)
    user_meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    reserved = sorted(WRITER_KEYS & user_meta.keys())
    if reserved:
        raise CheckpointFormatError(f"metadata keys {reserved} are written by ckptio itself and cannot be set")
    # the digest is the first metadata entry, so its place in the header is known without searching
    order = data_order(stored)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for key in order:
        n = stored[key].numel() * stored[key].element_size()
        offsets[key] = (pos, pos + n)
        pos += n
    chunk = chunk_bytes_for(pos)
    starts = chunk_starts((offsets[k] for k in order), chunk)
    # both digests lead the metadata, at places known without searching; the data fills them in
    meta = {"ckptio.crc32": "00000000", "ckptio.chunk_crc32": "00000000" * len(starts), **user_meta}
    meta.update({"ckptio.format": FORMAT_VERSION, "ckptio.chunk_bytes": str(chunk), "ckptio.data_bytes": str(pos)})
    if aliases:
        meta["ckptio.aliases"] = json.dumps(aliases)
    header: dict[str, Any] = {"__metadata__": meta}
    for key, t in stored.items():
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": list(offsets[key])}
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    if len(hbytes) > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"header of {len(hbytes)} bytes exceeds the {MAX_HEADER_BYTES}-byte safetensors limit ({len(stored)} tensors)"
        )
    digest_at = 8 + len(_DIGEST_PREFIX)
    chunks_at = digest_at + 8 + len(_CHUNKS_INFIX)
    # json.dumps keeps insertion order; check anyway
    if (
        hbytes[: len(_DIGEST_PREFIX)] != _DIGEST_PREFIX
        or hbytes[chunks_at - 8 - len(_CHUNKS_INFIX) : chunks_at - 8] != _CHUNKS_INFIX
    ):
        raise AssertionError("the digests are not where the writer put them")
    start = f.tell()
    write_all(f, memoryview(struct.pack("<Q", len(hbytes)) + hbytes))
    if any(isinstance(t, LazyTensor) for t in stored.values()):
        digest, chunk_digests = _write_lazy(f, stored, order, starts)
    else:
        pieces = [
            view[i : i + _CHUNK]
            for view in map(_as_bytes, (stored[k] for k in order))
            for i in range(0, len(view), _CHUNK)
        ]
        crc = _Checksum(pieces, starts)
        try:
            for piece in pieces:
                write_all(f, piece)
        finally:
            digest, chunk_digests = crc.result()
    end = f.tell()
    f.seek(start + digest_at)
    write_all(f, memoryview(digest.encode()))
    f.seek(start + chunks_at)
    write_all(f, memoryview(chunk_digests.encode()))
    f.seek(end)


def _write_lazy(
    f: IO[bytes], stored: Mapping[str, torch.Tensor | LazyTensor], order: list[str], starts: list[int]
) -> tuple[str, str]:
    """Write tensors one at a time, materializing lazy ones on a second thread up to ``ahead`` tensors before the
    writer reaches them: a gather overlaps the previous tensor's write, and at most ``ahead`` + 1 materialized
    tensors wait to be written (one more is being digested). Materializing runs in writing order, one at a time
    (a gather's collectives stay ordered)."""
    lazy = [k for k in order if isinstance(stored[k], LazyTensor)]
    ahead = max((stored[k].ahead for k in lazy), default=0)  # type: ignore[union-attr]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptio-materialize")
    # the digest of the tensor just written runs beside the next one's write (it holds that tensor meanwhile)
    digester = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptio-crc32")
    pending: dict[str, concurrent.futures.Future[torch.Tensor | list[torch.Tensor]]] = {}
    digesting: concurrent.futures.Future[None] | None = None
    submitted = 0

    def submit_up_to(count: int) -> None:
        nonlocal submitted
        while submitted < len(lazy) and len(pending) < count:
            key = lazy[submitted]
            pending[key] = pool.submit(stored[key].materialize, key)  # type: ignore[union-attr]
            submitted += 1

    digest = _Digest(starts)
    try:
        for key in order:
            t = stored[key]
            if isinstance(t, LazyTensor):
                submit_up_to(1)
                data = pending.pop(key).result()
                submit_up_to(ahead)  # the next ones gather while this one is written
            else:
                data = t
            views = [_as_bytes(p) for p in (data if isinstance(data, list) else [data])]
            for view in views:
                for i in range(0, len(view), _CHUNK):
                    write_all(f, view[i : i + _CHUNK])
            if digesting is not None:
                digesting.result()
            digesting = digester.submit(lambda views=views: [digest.update(v) for v in views] and None)
            del data, views
        if digesting is not None:
            digesting.result()
    finally:
        # a failed write: what is not started never starts, what runs finishes (its collective completes)
        pool.shutdown(wait=True, cancel_futures=True)
        digester.shutdown(wait=True)
    return digest.finish()


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class SafetensorsHeader:
    """A validated header: tensor entries in file order of keys, metadata, and where data starts."""

    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise CorruptCheckpointError(f"duplicate tensor name {dup!r}")
    return out


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _empty(shape: Any, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    # a view of an empty tensor, as the reference makes it: torch.empty refuses some shapes a view accepts
    return torch.empty(0, dtype=dtype, device=device).view(shape)


def _check_empty_shape(key: str, shape: list[int], dtype: torch.dtype, bad: Any) -> None:
    """A zero-element tensor can still have dims torch cannot represent (strides past int64)."""
    try:
        _empty(shape, dtype, "meta")
    except (RuntimeError, TypeError, OverflowError, ValueError):
        raise bad(f"tensor {key!r} has shape {shape}, which torch cannot represent") from None


def read_header(f: IO[bytes], file_size: int, source: str) -> SafetensorsHeader:
    """Read and validate a safetensors header; checks offsets against the file length (no data pass)."""

    def bad(msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{source}: {msg}")

    if file_size < 8:
        raise bad(f"file is {file_size} bytes, too short for a safetensors header")
    f.seek(0)
    raw = f.read(8)
    if len(raw) != 8:
        raise bad("file ended inside the header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES:  # what a text file or any other format gives
        raise bad(
            f"not a safetensors file: its first 8 bytes {raw!r} give a header length of {n}, which exceeds "
            f"the {MAX_HEADER_BYTES}-byte limit"
        )
    if n > file_size - 8:
        raise bad(f"header length {n} is larger than the file ({file_size} bytes): truncated or not safetensors")
    hbytes = f.read(n)
    if len(hbytes) != n:
        raise bad("file ended inside the header")
    try:
        text = hbytes.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_not_json)
    except CorruptCheckpointError as e:
        raise bad(str(e)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    if "\\u" in text:  # only \u escapes can smuggle lone surrogates past the UTF-8 decode
        try:
            json.dumps(header, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad("header holds a lone surrogate (\\ud800-\\udfff escape): not valid UTF-8") from None
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent or null: the reference accepts both
        metadata = {}
    elif type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    if "ckptio.format" in metadata:
        check_format_version(metadata["ckptio.format"], source)
    data_size = file_size - 8 - n
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    spans: list[tuple[int, int, str]] = []
    # exact type checks instead of isinstance/all(): this loop is most of the cost of opening a checkpoint
    for key, e in header.items():
        if type(e) is not dict:
            raise bad(f"entry for {key!r} is not an object")
        name, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        dtype = _DTYPES.get(name) if type(name) is str else None
        if dtype is None:
            if type(name) is str and name in _UNSUPPORTED_DTYPES:
                raise CheckpointFormatError(f"{source}: tensor {key!r} has dtype {name}, which ckptio does not support")
            raise bad(f"tensor {key!r} has unknown dtype {name!r}")
        numel = 1
        if type(shape) is list:
            for d in shape:
                # the reference multiplies dims in order and refuses a product past 64 bits; torch needs int64 dims
                if type(d) is not int or not 0 <= d <= _INT64_MAX or numel * d >= _U64_LIMIT:
                    numel = -1
                    break
                numel *= d
        if numel < 0 or type(shape) is not list:
            raise bad(f"tensor {key!r} has invalid shape {shape!r}")
        if numel == 0 and len(shape) > 1:
            _check_empty_shape(key, shape, dtype, bad)
        if type(offs) is not list or len(offs) != 2:
            raise bad(f"tensor {key!r} has invalid data_offsets {offs!r}")
        begin, end = offs
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            raise bad(f"tensor {key!r} has invalid data_offsets {offs!r}")
        if end - begin != numel * _ITEMSIZE[name]:
            raise bad(
                f"tensor {key!r}: shape {shape} of {name} needs {numel * _ITEMSIZE[name]} bytes, "
                f"offsets give {end - begin}"
            )
        entries[key] = (dtype, tuple(shape), begin, end)
        spans.append((begin, end, key))
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin < pos:
            raise bad(f"tensor {key!r} overlaps another tensor (offset {begin} < {pos})")
        if begin > pos:
            raise bad(f"gap in the data section before tensor {key!r} (offset {begin}, expected {pos})")
        pos = end
    if pos > data_size:
        raise bad(f"truncated: header describes {pos} bytes of tensor data but the file holds {data_size}")
    if pos < data_size:
        raise bad(f"{data_size - pos} unexpected bytes after the last tensor")
    declared = metadata.get("ckptio.data_bytes")
    if declared is not None and declared != str(pos):
        raise bad(f"metadata says {declared} data bytes but the header describes {pos}")
    return SafetensorsHeader(entries=entries, metadata=metadata, data_start=8 + n, file_size=file_size)


class _Views:
    """Tensors over one buffer (a private file mapping, or the data read into memory).

    Each tensor gets a storage of exactly its own bytes: pickling a loaded tensor (``torch.save``)
    then writes only those bytes, and tensors of different dtypes never share a storage.
    """

    def __init__(self, buf: Any, base: int):
        self.buf, self.base = buf, base

    def get(self, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> torch.Tensor:
        if end == begin:
            return _empty(shape, dtype)
        at = self.base + begin
        if at % dtype.itemsize:  # files from other writers may misalign: copy, never a bad pointer
            raw = torch.frombuffer(self.buf, dtype=torch.uint8, count=end - begin, offset=at).clone()
            return raw.view(dtype).view(shape)
        return torch.frombuffer(self.buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=at).view(shape)


def file_size(f: IO[bytes]) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pos = f.tell()
        size = f.seek(0, os.SEEK_END)
        f.seek(pos)
        return size


def read_safetensors(f: IO[bytes], source: str, *, mmap_file: bool = True) -> tuple[LazyTensors, dict[str, str]]:
    """Tensors (in header key order, aliases re-tied) and metadata from an open safetensors file.

    With ``mmap_file`` the tensors are views over a private copy-on-write mapping: opening costs
    only the header, pages load on first touch, processes share the page cache, and writes to a
    tensor never reach the file. Otherwise the data section is read into one buffer.
    """
    size = file_size(f)
    hdr = read_header(f, size, source)
    if mmap_file and hasattr(f, "fileno") and size > 0:
        buf: Any = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = hdr.data_start
    else:
        f.seek(hdr.data_start)
        buf = bytearray(size - hdr.data_start)
        got = f.readinto(buf) if hasattr(f, "readinto") else None
        if got is None:
            data = f.read()
            got = len(data)
            buf[:got] = data
        if got != len(buf):
            raise CorruptCheckpointError(f"{source}: file shrank while reading ({got} of {len(buf)} data bytes)")
        base = 0
    aliases: dict[str, str] = {}
    raw = hdr.metadata.get("ckptio.aliases")
    if raw:
        try:
            aliases = json.loads(raw)
            ok = isinstance(aliases, dict) and all(
                isinstance(t, str) and t in hdr.entries and a not in hdr.entries for a, t in aliases.items()
            )
        except ValueError:
            ok = False
        if not ok:
            raise CorruptCheckpointError(f"{source}: invalid ckptio.aliases metadata: {raw[:200]!r}")
    return LazyTensors(_Views(buf, base), hdr.entries, aliases), hdr.metadata


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only state dict whose tensor objects are made on first access.

    Everything was validated with the header; a tensor is a view over the mapping, created (and
    kept) when first asked for, so opening a checkpoint costs its header, whatever its tensor
    count. Aliases (tied weights) return the very object of the key they alias.
    """

    def __init__(self, views: _Views, entries: Mapping[str, Any], aliases: Mapping[str, str]):
        self._views, self._entries, self._aliases = views, entries, aliases
        self._made: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._made.get(key)
        if t is None:
            target = self._aliases.get(key, key)
            t = self._made.get(target)
            if t is None:
                t = self._made[target] = self._views.get(*self._entries[target])
            self._made[key] = t
        return t

    def __iter__(self) -> Iterator[str]:
        yield from self._entries
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._entries) + len(self._aliases)

    def __contains__(self, key: object) -> bool:
        return key in self._entries or key in self._aliases


@dataclass(frozen=True)
class ChunkDigests:
    """The per-chunk CRC-32s of a data section: chunk ``i`` is data bytes ``[starts[i], starts[i + 1])``."""

    starts: tuple[int, ...]
    crcs: tuple[int, ...]
    data_bytes: int

    def span(self, begin: int, end: int) -> range:
        """The chunks covering data bytes ``[begin, end)``."""
        if end <= begin:
            return range(0)
        return range(bisect.bisect_right(self.starts, begin) - 1, bisect.bisect_left(self.starts, end))

    def bounds(self, i: int) -> tuple[int, int]:
        return self.starts[i], self.starts[i + 1] if i + 1 < len(self.starts) else self.data_bytes

    def check(self, i: int, data: bytes | memoryview, source: str) -> None:
        """Raise unless ``data`` is chunk ``i``'s exact content."""
        got = crc32(data)
        if got != self.crcs[i]:
            begin, end = self.bounds(i)
            raise CorruptCheckpointError(
                f"{source}: data bytes [{begin}, {end}) do not match their digest "
                f"(crc32 {got:08x}, header says {self.crcs[i]:08x})"
            )


def chunk_digests(hdr: SafetensorsHeader, source: str) -> ChunkDigests | None:
    """The header's per-chunk digests (None in files written without them: older ckptio, other writers)."""
    raw, size_s = hdr.metadata.get("ckptio.chunk_crc32"), hdr.metadata.get("ckptio.chunk_bytes")
    if raw is None or size_s is None:
        return None
    size = int(size_s) if size_s.isdigit() and len(size_s) < 16 else 0
    starts = chunk_starts(sorted((b, e) for _, _, b, e in hdr.entries.values()), size) if size > 0 else []
    if size <= 0 or len(raw) != 8 * len(starts) or (raw and not re.fullmatch(r"[0-9a-f]+", raw)):
        raise CorruptCheckpointError(
            f"{source}: invalid chunk digests in the header ({len(raw)} hex digits for chunks of {size_s!r} bytes)"
        )
    crcs = tuple(int(raw[i : i + 8], 16) for i in range(0, len(raw), 8))
    return ChunkDigests(tuple(starts), crcs, hdr.file_size - hdr.data_start)


def block_ranges(
    shape: tuple[int, ...], itemsize: int, offset: tuple[int, ...], block: tuple[int, ...], limit: int = 4096
) -> list[tuple[int, int]]:
    """The byte ranges, from the tensor's first byte, of a block of a row-major tensor.

    Beyond ``limit`` separate runs, one span covering them all (reading more is safe, less is not).
    """
    if any(b == 0 for b in block):
        return []
    if not shape:
        return [(0, itemsize)]
    strides = [math.prod(shape[j + 1 :]) * itemsize for j in range(len(shape))]
    k = len(shape) - 1
    while k > 0 and block[k] == shape[k]:  # trailing whole dimensions make one run
        k -= 1
    run = block[k] * strides[k]
    first = sum(o * s for o, s in zip(offset, strides, strict=True))
    if math.prod(block[:k]) > limit:
        last = sum((o + b - 1) * s for o, b, s in zip(offset, block, strides, strict=True)) + itemsize
        return [(first, last)]
    starts = (first + sum(i * s for i, s in zip(idx, strides, strict=False)) for idx in
              itertools.product(*(range(b) for b in block[:k])))  # fmt: skip
    return [(start, start + run) for start in starts]


class StoredTensor:
    """A tensor of a file held only in part, not read yet: its dtype and shape, and reads of what is held."""

    def __init__(self, tensors: PartialTensors, key: str):
        self._tensors, self._key = tensors, key
        self.dtype, self.shape = tensors._entries[key][0], torch.Size(tensors._entries[key][1])

    def region(self, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The block at ``offset`` of ``shape`` (a view of the mapped file), once checked."""
        return self._tensors.region(self._key, offset, shape)

    def read(self) -> torch.Tensor:
        return self._tensors.region(self._key, (0,) * len(self.shape), tuple(self.shape))

    def stride(self) -> tuple[int, ...]:
        return torch.empty(self.shape, device="meta").stride()


class PartialTensors(LazyTensors):
    """The tensors of a file of which only ``held`` data bytes are present (a node cache's ranges).

    A tensor wholly held reads as usual; any other is a ``StoredTensor``, whose blocks read only
    where held. Every read is first checked against the header's chunk digests: bytes that were
    not fetched, or do not match, raise; they never read as zeros.
    """

    def __init__(self, tensors: LazyTensors, held: list[tuple[int, int]], chunks: ChunkDigests, source: str):
        super().__init__(tensors._views, tensors._entries, tensors._aliases)
        self._held, self._chunks, self._source = merge_ranges(held), chunks, source
        self._checked: set[int] = set()

    def _holds(self, begin: int, end: int) -> bool:
        # whole chunks: only a whole chunk can be checked against its digest
        span = self._chunks.span(begin, end)
        return not span or covers(self._held, self._chunks.bounds(span.start)[0], self._chunks.bounds(span[-1])[1])

    def _check(self, begin: int, end: int, key: str) -> None:
        if not self._holds(begin, end):
            raise CheckpointError(
                f"{self._source}: tensor {key!r} needs data bytes [{begin}, {end}), which were not fetched into "
                "the node cache (it holds only the ranges this node's ranks asked for)"
            )
        views = self._views
        for i in self._chunks.span(begin, end):
            if i not in self._checked:
                cb, ce = self._chunks.bounds(i)
                with memoryview(views.buf) as whole:
                    self._chunks.check(i, whole[views.base + cb : views.base + ce], self._source)
                self._checked.add(i)

    def __getitem__(self, key: str) -> Any:
        target = self._aliases.get(key, key)
        _, _, begin, end = self._entries[target]
        if not self._holds(begin, end):
            return StoredTensor(self, target)
        self._check(begin, end, target)
        return super().__getitem__(key)

    def region(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        dtype, full, begin, _ = self._entries[key]
        for b, e in block_ranges(full, dtype.itemsize, offset, shape):
            self._check(begin + b, begin + e, key)
        return LazyTensors.__getitem__(self, key)[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def verify_safetensors(f: IO[bytes], source: str) -> None:
    """Full check: header and offsets, then the CRC-32 of the data section against the header's."""
    if check_digest(f, source) is None:
        raise CorruptCheckpointError(f"{source}: no ckptio.crc32 digest in the header; cannot verify contents")


def check_digest(f: IO[bytes], source: str) -> dict[str, str] | None:
    """The header metadata once the data matches its CRC-32; None for a valid file with no digest to check."""
    size = file_size(f)
    hdr = read_header(f, size, source)
    expected = hdr.metadata.get("ckptio.crc32")
    if expected is None:
        return None
    chunks = chunk_digests(hdr, source)
    digest = _Digest(list(chunks.starts) if chunks else [0])
    f.seek(hdr.data_start)
    buf = bytearray(min(_CHUNK, max(size - hdr.data_start, 1)))
    view = memoryview(buf)
    while True:
        n = f.readinto(view) if hasattr(f, "readinto") else None
        if n is None:
            piece = f.read(len(buf))
            n = len(piece)
            view[:n] = piece
        if not n:
            break
        digest.update(view[:n])
    crc, per_chunk = digest.finish()
    if crc != expected:
        raise CorruptCheckpointError(f"{source}: content digest mismatch (crc32 {crc}, header says {expected})")
    if chunks is not None and per_chunk != hdr.metadata["ckptio.chunk_crc32"]:
        bad = next(i for i, c in enumerate(chunks.crcs) if f"{c:08x}" != per_chunk[8 * i : 8 * i + 8])
        raise CorruptCheckpointError(
            f"{source}: the header's digest of data bytes [{chunks.bounds(bad)[0]}, {chunks.bounds(bad)[1]}) does not "
            "match them"
        )
    return hdr.metadata


# --------------------------------------------------------------------------------------------
# legacy .pt


_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


def _printable(text: str) -> str:
    """Text without terminal escape sequences or control characters (error messages reach terminals)."""
    return _ESCAPES.sub("", text)


def _unpickling_reason(error: BaseException) -> str:
    """The weights-only unpickler's own reason, without torch's advice to load untrusted code."""
    text = _printable(str(error)).split("Check the documentation")[0]
    _, marker, reason = text.partition("WeightsUnpickler error:")
    if not marker:  # torch words some refusals without that prefix: the last paragraph is the reason
        reason = next((p for p in reversed(text.split("\n\n")) if p.strip()), type(error).__name__)
    return " ".join(reason.split()).split(" was not an allowed global")[0][:200]


# Where .pt training checkpoints keep the weights, in the order they are looked for.
PT_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "policy")


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def save_pt(f: IO[bytes], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """torch.save a plain structure (state dict + string metadata) that weights_only loading accepts."""
    state = {k: v.detach().to("cpu") for k, v in tensors.items()}
    torch.save({"state_dict": state, "ckptio_metadata": dict(metadata or {})}, f)


def load_pt(
    f: IO[bytes], source: str, *, trusted: bool = False, mmap_file: bool = True
) -> tuple[dict[str, torch.Tensor] | torch.nn.Module, dict[str, str]]:
    """A legacy .pt: a state dict (plain or under ``state_dict``) or, only if trusted, a pickled module."""
    obj = load_pt_object(f, source, trusted=trusted, mmap_file=mmap_file)
    if isinstance(obj, torch.nn.Module):
        return obj, {}
    metadata: dict[str, str] = {}
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        # a training checkpoint: weights under one of the usual keys, beside optimizer state, epoch...
        key = pt_weights_key(obj)
        if key is not None:
            raw_meta = obj.get("ckptio_metadata") or {}
            metadata = {str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, Mapping) else {}
            if type(obj.get("epoch")) is int and obj["epoch"] >= 0:
                metadata.setdefault("ckptio.epoch", str(obj["epoch"]))
            if key != "state_dict" or "ckptio_metadata" not in obj:
                metadata["ckptio.pt_key"] = key
                log.info("%s: weights from the %r entry of a training checkpoint", source, key)
            obj = obj[key]
    if not isinstance(obj, Mapping) or not _all_tensors(obj):
        raise CheckpointFormatError(
            f"{source}: expected a state dict (names to tensors), a training checkpoint with one under "
            f"{'/'.join(PT_WEIGHT_KEYS)}, or a module; got {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else "")
        )
    return {str(k): v for k, v in obj.items()}, metadata


def pt_weights_key(obj: Mapping[Any, Any]) -> str | None:
    """The entry of a .pt training checkpoint that holds its weights (``model``, ``state_dict``...)."""
    return next((k for k in PT_WEIGHT_KEYS if isinstance(obj.get(k), Mapping) and _all_tensors(obj[k])), None)


def load_pt_object(f: IO[bytes], source: str, *, trusted: bool = False, mmap_file: bool = True) -> Any:
    """What a .pt file holds, unpickled with ``weights_only`` unless trusted; typed errors for the rest."""
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not trusted}
    path = getattr(f, "name", None)
    target: Any = f
    if mmap_file and isinstance(path, str) and os.path.isfile(path):
        target, kwargs["mmap"] = path, True
    try:
        obj = torch.load(target, **kwargs)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if "GLOBAL" not in reason:  # only a pickle that imports something is a security matter; else garbage
            raise CorruptCheckpointError(f"{source}: not a readable torch.save file: {reason}") from None
        raise CheckpointSecurityError(
            f"{source}: refused to unpickle objects other than tensors and plain containers ({reason}). "
            "If this is a whole pickled module from a source you trust, load it with trusted=True; "
            "better, convert it to safetensors once."
        ) from None
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{source}: file vanished while opening it") from None
    except Exception as e:  # torch.load fails on garbage with anything: KeyError, IndexError, EOFError...
        if mmap_file and kwargs.get("mmap") and "mmap can only be used" in str(e):  # old non-zip .pt files
            f.seek(0)
            return load_pt_object(f, source, trusted=trusted, mmap_file=False)
        raise CorruptCheckpointError(
            f"{source}: not a readable torch.save file: {type(e).__name__}: {_printable(str(e))[:200]}"
        ) from None
    return obj
