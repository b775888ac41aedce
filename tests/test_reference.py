"""ckptio's reader against the reference safetensors implementation, differentially.

Valid files come from ``safetensors.torch.save`` across every dtype both support; mutations hit the
length prefix, the header JSON and the data. For each file: where the reference loads it, ckptio
loads the same tensors (bit for bit) and metadata; where the reference refuses it, ckptio refuses
it with a CheckpointError; ckptio never raises anything else. ckptio is deliberately stricter in
three places (README): duplicate tensor names, ``ckptio.*`` metadata that contradicts the file,
and sub-byte dtypes (F4, F6), refused as unsupported.

Bounded to a few seconds by default; ``pytest tests/test_reference.py --stress`` runs 20,000 files.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as reference_save

import ckptio
from ckptio.formats import read_safetensors

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu,
}  # fmt: skip
# Where ckptio refuses what the reference reads, on purpose (see the module docstring).
DELIBERATE = ("duplicate tensor name", "metadata says", "ckptio.aliases", "which ckptio does not support")


def _reference(path):
    try:
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            return "ok", tensors, f.metadata() or {}
    except Exception as e:  # the reference raises SafetensorError, TypeError, RuntimeError...
        return "error", type(e).__name__, str(e)


def _ckptio(path):
    try:
        with open(path, "rb") as f:
            tensors, metadata = read_safetensors(f, path, mmap_file=True)
            return "ok", {k: tensors[k] for k in tensors}, metadata
    except ckptio.CheckpointError as e:
        return "error", type(e).__name__, str(e)


def _raw(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else b""


def check_agrees(tmp_path, blob):
    path = str(tmp_path / "x.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    ref, ours = _reference(path), _ckptio(path)  # anything but a CheckpointError from ckptio fails here
    if ref[0] == "ok" and ours[0] == "ok":
        assert ours[1].keys() == ref[1].keys()
        for k, r in ref[1].items():
            o = ours[1][k]
            assert (o.dtype, o.shape) == (r.dtype, r.shape), k
            assert o.numel() == 0 or torch.equal(_raw(o), _raw(r)), k
        assert ours[2] == ref[2]
    elif ref[0] == "ok":
        assert any(d in ours[2] for d in DELIBERATE), f"ckptio refused what the reference reads: {ours}"
    else:
        assert ours[0] == "error", f"ckptio read what the reference refuses ({ref[1]}: {ref[2][:200]})"
        assert "x.safetensors" in ours[2]  # the error names the file
    return ref[0], ours[0]


shapes = st.lists(st.integers(0, 4), max_size=3)
tensor_specs = st.dictionaries(
    st.text(min_size=1, max_size=6).filter(lambda k: k != "__metadata__"),
    st.tuples(st.sampled_from(sorted(DTYPES)), shapes),
    max_size=4,
)
metadata_maps = st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)


@st.composite
def valid_files(draw):
    tensors = {}
    for name, (dtype_name, shape) in draw(tensor_specs).items():
        dtype = DTYPES[dtype_name]
        n = 1
        for d in shape:
            n *= d
        raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(shape).clone()
    return reference_save(tensors, metadata=draw(metadata_maps))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _repack(header_bytes: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


@st.composite
def mutated_files(draw):
    blob = draw(valid_files())
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = blob[8 : 8 + n], blob[8 + n :]
    kind = draw(st.sampled_from(["none", "length", "byte", "field", "metadata", "text", "data"]))
    try:
        json.loads(header)
    except ValueError:  # the reference wrote a header it cannot read itself: mutate only bytes
        kind = draw(st.sampled_from(["none", "length", "byte", "data"]))
    if kind == "length":
        delta = draw(st.integers(-16, 16) | st.integers(0, 2**64 - 1))
        return struct.pack("<Q", max(0, n + delta) if delta < 2**32 else delta) + blob[8:]
    if kind == "byte" and header:
        at = draw(st.integers(0, len(header) - 1))
        header = header[:at] + bytes([draw(st.integers(0, 255))]) + header[at + 1 :]
    elif kind == "field":
        doc = json.loads(header)
        names = [k for k in doc if k != "__metadata__"]
        if names:
            entry = doc[draw(st.sampled_from(names))]
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            entry[field] = draw(
                json_values
                | st.sampled_from(["F4", "F6_E2M3", "F8_E8M0", "f32", "BOOL"])
                | st.lists(st.integers(0, 2**64), max_size=3)
                | st.lists(st.sampled_from([0, 2**40, 2**62, 2**63 - 1, 2**63]), max_size=3)
            )
        header = json.dumps(doc, allow_nan=True).encode()
    elif kind == "metadata":
        doc = json.loads(header)
        doc["__metadata__"] = draw(json_values)
        header = json.dumps(doc, allow_nan=True).encode()
    elif kind == "text":  # edits json.dumps never makes: non-JSON constants, lone surrogates, padding
        insert = draw(st.sampled_from(['"\\ud800"', '"\\udc80x"', "NaN", "Infinity", '"\\ud83d\\ude00"', " ", "\x00"]))
        doc = json.loads(header)
        doc["__metadata__"] = {"k": "PLACEHOLDER"}
        text = json.dumps(doc)
        header = text.replace('"PLACEHOLDER"', insert if insert.startswith('"') else f'"v", "x": {insert}').encode()
    elif kind == "data":
        data = draw(st.sampled_from([data[:-1], data + b"\0", data[::-1]])) if data else data + b"\0"
    return _repack(header, data)


def _examples(config) -> int:
    return 20_000 if config.getoption("--stress") else 300


@pytest.fixture
def budget(request):
    return _examples(request.config)


def test_valid_files_from_the_reference_load_identically(tmp_path, budget):
    @settings(max_examples=budget, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(valid_files())
    def run(blob):
        ref, ours = check_agrees(tmp_path, blob)
        assume(ref == "ok")  # safetensors 0.8 writes {} tensors with {} metadata as a file it cannot read
        assert ours == "ok"

    run()


def test_mutated_files_are_accepted_and_refused_as_the_reference_does(tmp_path, budget):
    @settings(max_examples=budget, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(mutated_files())
    def run(blob):
        check_agrees(tmp_path, blob)

    run()


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _file(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return _repack(raw, data)


# Cases outside testing found, each where ckptio and the reference used to disagree.
KNOWN = {
    "metadata 0": _file({"__metadata__": 0, "a": F32}, bytes(8)),
    "metadata false": _file({"__metadata__": False, "a": F32}, bytes(8)),
    "metadata empty string": _file({"__metadata__": "", "a": F32}, bytes(8)),
    "metadata list": _file({"__metadata__": [], "a": F32}, bytes(8)),
    "metadata null": _file({"__metadata__": None, "a": F32}, bytes(8)),
    "lone surrogate in metadata": _file(b'{"__metadata__":{"k":"\\udc80"},"a":' + json.dumps(F32).encode() + b"}", bytes(8)),
    "NaN in an entry": _file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', bytes(8)),
    "Infinity in metadata": _file(b'{"__metadata__":{"k":Infinity},"a":' + json.dumps(F32).encode() + b"}", bytes(8)),
    "zero elements, dim 2**63": _file({"a": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}),
    "zero elements, dims 2**40 x 2**40": _file({"a": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}),
    "dims overflow before the zero": _file({"a": {"dtype": "U8", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}),
    "F8_E8M0": _file({"a": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 2]}}, b"\x7f\x80"),
    "leading whitespace": _file(b' {"a":' + json.dumps(F32).encode() + b"}", bytes(8)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_disagreements_are_gone(tmp_path, name):
    check_agrees(tmp_path, KNOWN[name])


F32_B = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
# Valid for the reference, refused on purpose: ckptio's own metadata that contradicts the file it is in.
CONTRADICTIONS = {
    "data_bytes fewer": ({"ckptio.data_bytes": "8"}, "metadata says 8 data bytes"),
    "data_bytes more": ({"ckptio.data_bytes": "24"}, "metadata says 24 data bytes"),
    "alias onto a stored name": ({"ckptio.aliases": json.dumps({"a": "b"})}, "ckptio.aliases"),
    "alias of nothing": ({"ckptio.aliases": json.dumps({"c": "d"})}, "ckptio.aliases"),
    "aliases not an object": ({"ckptio.aliases": "[]"}, "ckptio.aliases"),
}


@pytest.mark.parametrize("name", sorted(CONTRADICTIONS))
def test_ckptio_metadata_that_contradicts_the_file_is_refused(tmp_path, name):
    metadata, message = CONTRADICTIONS[name]
    path = tmp_path / "c.safetensors"
    path.write_bytes(_file({"__metadata__": metadata, "a": F32, "b": F32_B}, bytes(16)))
    assert _reference(str(path))[0] == "ok"
    verdict = _ckptio(str(path))
    assert verdict[:2] == ("error", "CorruptCheckpointError") and message in verdict[2], verdict


def test_sub_byte_dtypes_are_unsupported_not_corrupt(tmp_path):
    path = tmp_path / "f4.safetensors"
    path.write_bytes(_file({"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\x12\x34"))
    assert _reference(str(path))[0] == "ok"
    with pytest.raises(ckptio.CheckpointFormatError, match="dtype F4, which ckptio does not support"):
        ckptio.load_from_uri(str(path))


def test_header_bound_is_the_reference_bound(tmp_path):
    from ckptio.formats import MAX_HEADER_BYTES, write_safetensors

    assert MAX_HEADER_BYTES == 100_000_000
    blob = struct.pack("<Q", 100_000_001) + b"{}"
    path = tmp_path / "h.safetensors"
    path.write_bytes(blob)
    assert _reference(str(path))[0] == "error"
    with pytest.raises(ckptio.CorruptCheckpointError, match="exceeds"):
        ckptio.load_from_uri(str(path))
    # a header of exactly the bound is a valid file for both (JSON allows the trailing spaces)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES) + b"{}")
        f.write(b" " * (MAX_HEADER_BYTES - 2))
    assert _reference(str(path))[0] == "ok"
    assert _ckptio(str(path)) == ("ok", {}, {})
    path.unlink()
    # the writer refuses to make a header the reference would refuse
    many = {f"{'k' * 200}{i}": torch.empty(0) for i in range(400_000)}
    with pytest.raises(ckptio.CheckpointFormatError, match="exceeds the 100000000-byte"):
        write_safetensors(open(tmp_path / "big.safetensors", "wb"), many)
