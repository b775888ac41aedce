"""The safetensors writer/reader and legacy .pt: round trips, interop, mmap semantics."""

import io
import json
import os
import struct
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ckptio
from ckptio.formats import _DTYPES, read_safetensors, write_safetensors


def _save(path, tensors, metadata=None):
    with open(path, "wb") as f:
        write_safetensors(f, tensors, metadata)


def _load(path, mmap=True):
    with open(path, "rb") as f:
        return read_safetensors(f, str(path), mmap_file=mmap)


def _sample(dtype, shape=(3, 5)):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(lo, hi, shape, dtype=torch.int64).to(dtype)


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("name", sorted(_DTYPES))
@pytest.mark.parametrize("mmap", [True, False])
def test_every_dtype_round_trips_and_stock_reader_agrees(tmp_path, name, mmap):
    t = _sample(_DTYPES[name])
    path = tmp_path / "x.safetensors"
    _save(path, {"t": t, "scalar": _sample(_DTYPES[name], ())})
    loaded, _ = _load(path, mmap=mmap)
    _same(loaded["t"], t)
    assert loaded["scalar"].shape == ()
    with safe_open(str(path), "pt") as f:
        _same(f.get_tensor("t"), t)


def test_keys_keep_state_dict_order_and_tensors_are_aligned(tmp_path):
    sd = {"z_byte": torch.ones(3, dtype=torch.uint8), "a_f64": torch.ones(2, dtype=torch.float64),
          "m_bf16": torch.ones(5, dtype=torch.bfloat16), "b_f32": torch.ones(7)}  # fmt: skip
    _save(tmp_path / "o.safetensors", sd)
    loaded, _ = _load(tmp_path / "o.safetensors")
    assert list(loaded) == list(sd)
    for t in loaded.values():
        assert t.data_ptr() % t.element_size() == 0
    # laid out aligned in the file, so that loading maps them rather than copying the misaligned ones
    with open(tmp_path / "o.safetensors", "rb") as f:
        hdr = ckptio.formats.read_header(f, os.path.getsize(tmp_path / "o.safetensors"), "o")
    assert hdr.data_start % 8 == 0
    for key, (dtype, _, begin, _) in hdr.entries.items():
        assert begin % dtype.itemsize == 0, key


def test_empty_scalar_noncontiguous_and_many_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"empty": torch.empty(0, 3), "scalar": torch.tensor(3.5), "transposed": base.t(), "strided": base[:, ::2]}
    sd.update({f"layer{i}.w": torch.full((i % 7 + 1,), float(i)) for i in range(1000)})
    _save(tmp_path / "m.safetensors", sd)
    loaded, _ = _load(tmp_path / "m.safetensors")
    assert list(loaded) == list(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    assert loaded["empty"].shape == (0, 3)
    assert loaded["scalar"].shape == ()


def test_tied_tensors_stored_once_and_retied(tmp_path):
    w = torch.randn(64, 64)
    sd = {"embed.weight": w, "head.weight": w, "bias": torch.zeros(64)}
    path = tmp_path / "tied.safetensors"
    _save(path, sd)
    assert os.path.getsize(path) < 64 * 64 * 4 * 2  # not duplicated
    loaded, meta = _load(path)
    assert list(loaded) == ["embed.weight", "bias", "head.weight"] or set(loaded) == set(sd)
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert json.loads(meta["ckptio.aliases"]) == {"head.weight": "embed.weight"}
    with safe_open(str(path), "pt") as f:  # still a standard file
        assert set(f.keys()) == {"embed.weight", "bias"}


def test_tied_module_weights_round_trip_through_instantiate(tmp_path, env_meta):
    from archs import MLPArch

    arch = MLPArch(tied=True)
    m = arch.make_policy(env_meta)
    uri = ckptio.save_policy_artifact(str(tmp_path / "t"), m, arch)
    module = ckptio.load_from_uri(uri).instantiate(env_meta)
    assert module.tied_out.weight is module.body.weight
    assert torch.equal(module.body.weight, m.body.weight)


def test_stock_writer_interop_without_architecture(tmp_path, env_meta):
    from archs import MLPArch

    m = MLPArch().make_policy(env_meta)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "stock.safetensors"))
    artifact = ckptio.load_from_uri(str(tmp_path / "stock.safetensors"))
    assert artifact.policy_architecture is None
    with pytest.raises(ckptio.ArchitectureError, match="carries no architecture"):
        artifact.instantiate(env_meta)
    module = artifact.instantiate(env_meta, policy_architecture=MLPArch())
    assert torch.equal(module.head.weight, m.head.weight)


def test_writes_to_loaded_tensors_never_reach_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    _save(path, {"w": torch.zeros(1024)})
    before = path.read_bytes()
    loaded, _ = _load(path)
    loaded["w"].add_(1.0)
    assert loaded["w"].sum().item() == 1024
    assert path.read_bytes() == before
    again, _ = _load(path)
    assert again["w"].sum().item() == 0


def test_mmap_load_shares_file_pages(tmp_path):
    path = tmp_path / "big.safetensors"
    _save(path, {"w": torch.ones(1 << 20)})
    loaded, _ = _load(path, mmap=True)
    maps = open("/proc/self/maps").read()
    assert str(path) in maps  # tensor memory is a mapping of the file, not a private read buffer
    eager, _ = _load(path, mmap=False)
    assert torch.equal(eager["w"], loaded["w"])


def test_non_seekable_destination_is_spooled(tmp_path):
    class Stream(io.RawIOBase):
        def __init__(self):
            self.buf = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.buf += bytes(b)
            return len(b)

    s = Stream()
    write_safetensors(s, {"a": torch.arange(10)})
    (tmp_path / "s.safetensors").write_bytes(bytes(s.buf))
    loaded, meta = _load(tmp_path / "s.safetensors")
    assert torch.equal(loaded["a"], torch.arange(10))
    assert meta["ckptio.crc32"] == f"{zlib.crc32(bytes(s.buf[-80:])):08x}" != "00000000"


def test_misaligned_stock_file_loads_by_copy(tmp_path):
    # hand-made file: a 1-byte tensor first puts the float32 at an odd offset
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}  # fmt: skip
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    data = b"\x07" + struct.pack("<2f", 1.5, -2.0)
    (tmp_path / "mis.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)
    loaded, _ = _load(tmp_path / "mis.safetensors")
    assert loaded["b"].tolist() == [1.5, -2.0]
    assert loaded["b"].data_ptr() % 4 == 0


# ---- legacy .pt -----------------------------------------------------------------------------


def test_legacy_state_dict_pt_loads_with_weights_only(tmp_path, policy):
    torch.save(policy.state_dict(), tmp_path / "old.pt")
    artifact = ckptio.load_from_uri(str(tmp_path / "old.pt"))
    for k, v in policy.state_dict().items():
        assert torch.equal(artifact.state_dict[k], v)


def test_pickled_module_needs_trusted(tmp_path, policy):
    torch.save(policy, tmp_path / "module.pt")
    with pytest.raises(ckptio.CheckpointSecurityError, match="trusted=True"):
        ckptio.load_from_uri(str(tmp_path / "module.pt"))
    artifact = ckptio.load_from_uri(str(tmp_path / "module.pt"), trusted=True)
    assert isinstance(artifact.policy, torch.nn.Module)
    assert artifact.instantiate() is artifact.policy


def test_convert_pt_to_safetensors_and_back(tmp_path, policy, env_meta):
    from archs import MLPArch

    torch.save(policy.state_dict(), tmp_path / "a.pt")
    out = ckptio.convert(str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors"))
    back = ckptio.convert(out, str(tmp_path / "c.pt"))
    with safe_open(out, "pt") as f:
        assert set(f.keys()) == set(policy.state_dict())
    module = ckptio.load_from_uri(back).instantiate(env_meta, policy_architecture=MLPArch())
    assert torch.equal(module.embed.weight, policy.embed.weight)


def test_digest_is_the_standard_crc32_of_the_data_section(tmp_path):
    import zlib

    tensors = {f"t{i}": torch.randn(1000 + i).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(40)}
    path = tmp_path / "d.safetensors"
    with open(path, "wb") as f:
        write_safetensors(f, tensors)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    assert meta["ckptio.crc32"] == f"{zlib.crc32(raw[8 + n :]):08x}"
    assert int(meta["ckptio.data_bytes"]) == len(raw) - 8 - n


def test_a_failing_write_raises_and_leaves_no_checksum_thread(tmp_path):
    import threading

    class Full(io.RawIOBase):
        def __init__(self):
            self.pos = 0

        def writable(self):
            return True

        def seekable(self):
            return True

        def tell(self):
            return self.pos

        def write(self, b):
            if self.pos > 1000:
                raise OSError(28, "No space left on device")
            self.pos += len(b)
            return len(b)

    with pytest.raises(OSError, match="No space left"):
        # 256 MiB: the checksum thread is still busy when the write fails, so only a join stops it
        write_safetensors(Full(), {"a": torch.ones(32 << 20), "b": torch.ones(32 << 20)})
    assert not [t for t in threading.enumerate() if t.name == "ckptio-crc32"]


class _ShortWrites(io.RawIOBase):
    """A raw file that accepts at most 1000 bytes per write() call, as write(2) may."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.calls = 0

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self.buf.seek(pos, whence)

    def tell(self):
        return self.buf.tell()

    def write(self, data):
        self.calls += 1
        return self.buf.write(bytes(memoryview(data)[:1000]))


def test_short_writes_are_continued_not_dropped():
    tensors = {"a": torch.randn(3000), "b": torch.arange(10, dtype=torch.int64)}
    tensors |= {f"layer{i}.weight": torch.full((2,), float(i)) for i in range(100)}  # a header past 1000 bytes
    f = _ShortWrites()
    write_safetensors(f, tensors)
    assert f.calls > 15  # a 5 KB header and 13 KB of data in 1000-byte pieces
    loaded, _ = read_safetensors(io.BytesIO(f.buf.getvalue()), "short", mmap_file=False)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert ckptio.formats.verify_safetensors(io.BytesIO(f.buf.getvalue()), "short") is None


def test_digests_span_every_chunk_of_a_large_file(tmp_path, monkeypatch):
    """Files stream out and are verified in chunks: the CRC-32 carries across them (zlib's over the whole data)."""
    monkeypatch.setattr(ckptio.formats, "_CHUNK", 4096)  # many chunks without writing gigabytes
    tensors = {"a": torch.arange(5000, dtype=torch.float64), "b": torch.arange(3001, dtype=torch.int16)}
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        write_safetensors(f, tensors)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["ckptio.crc32"] == f"{zlib.crc32(raw[8 + n :]):08x}"
    assert len(raw) - 8 - n > 8 * 4096
    with open(path, "rb") as f:
        ckptio.formats.verify_safetensors(f, str(path))
    assert all(r.ok for r in ckptio.verify(str(path)))


def test_a_lazy_tensor_that_materializes_differently_is_refused(tmp_path):
    """A gathered tensor must match the header entry written before it: else the file would lie about its data."""
    from ckptio.formats import LazyTensor

    for made in (torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.float64)):
        lazy = LazyTensor(torch.float32, (2, 3), lambda made=made: made)
        with pytest.raises(ckptio.CheckpointFormatError, match="materialized as"):
            with open(tmp_path / "x.safetensors", "wb") as f:
                write_safetensors(f, {"w": lazy})


@pytest.mark.parametrize("ahead", [0, 2])
def test_lazy_tensors_materialize_ahead_of_the_writer_in_order_and_bounded(tmp_path, monkeypatch, ahead):
    """A sharded save gathers the next tensors while one is written: in writing order, at most ahead + 1 held,
    and the file is the one the same tensors make when they are all in memory."""
    import threading

    from ckptio.formats import LazyTensor

    tensors = {f"t{i}": torch.full((1000 + i,), float(i)) for i in range(8)}
    held, most, made = set(), [0], []
    lock = threading.Lock()

    def materialize(key):
        with lock:
            made.append(key)
            held.add(key)
            most[0] = max(most[0], len(held))
        if key == "t5" and fail:
            raise OSError(5, "Input/output error")
        return tensors[key]

    real_as_bytes = ckptio.formats._as_bytes

    def writing(t):  # the writer takes a tensor's bytes: it no longer waits in memory to be written
        with lock:
            held.difference_update(k for k, v in tensors.items() if v.data_ptr() == t.data_ptr())
        return real_as_bytes(t)

    monkeypatch.setattr(ckptio.formats, "_as_bytes", writing)
    lazy = {k: LazyTensor(t.dtype, tuple(t.shape), lambda k=k: materialize(k), ahead=ahead) for k, t in tensors.items()}
    fail = False
    with open(tmp_path / "lazy.safetensors", "wb") as f:
        write_safetensors(f, lazy)
    monkeypatch.undo()
    with open(tmp_path / "eager.safetensors", "wb") as f:
        write_safetensors(f, tensors)
    assert (tmp_path / "lazy.safetensors").read_bytes() == (tmp_path / "eager.safetensors").read_bytes()
    order = ckptio.formats.data_order(tensors)
    assert made == order and 1 <= most[0] <= ahead + 1
    # a failed gather stops the writer; nothing is gathered beyond what was already under way
    fail, made[:] = True, []
    with pytest.raises(OSError, match="Input/output error"):
        with open(tmp_path / "failed.safetensors", "wb") as f:
            write_safetensors(f, lazy)
    assert made == order[: len(made)] and len(made) <= order.index("t5") + 1 + ahead
