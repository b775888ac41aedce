"""Partial reads: per-chunk digests in the header, partial node-cache entries, reads only of what is held."""

from __future__ import annotations

import io
import json
import os
import re
import zlib

import pytest
import torch
from remote_fixtures import s3  # noqa: F401  (fixture)
from safetensors.torch import load as stock_load

import ckptio
from ckptio.cache import HELD, NodeCache
from ckptio.formats import (
    LazyTensor,
    StoredTensor,
    chunk_digests,
    read_header,
    verify_safetensors,
    write_safetensors,
)
from ckptio.layout import read_weights
from ckptio.storage import Storage, merge_ranges


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(300, 257, generator=g),  # 308400 bytes: 19 chunks of 16 KiB, the last one short
        "half": torch.randn(40, 1000, generator=g).half(),
        "small": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7.5),
        "exact": torch.randn(4096, generator=g),  # exactly one chunk
    }


def _written(tensors, lazy: bool = False) -> bytes:
    if lazy:  # the sharded save's path: tensors materialized as the writer reaches them
        tensors = {k: LazyTensor(v.dtype, tuple(v.shape), lambda v=v: v, ahead=1) for k, v in tensors.items()}
    f = io.BytesIO()
    write_safetensors(f, tensors, {"note": "x"})
    return f.getvalue()


@pytest.mark.parametrize("lazy", [False, True])
def test_each_tensor_is_digested_in_chunks_of_its_own_that_the_file_digest_agrees_with(lazy):
    tensors = _tensors()
    data = _written(tensors, lazy)
    hdr = read_header(io.BytesIO(data), len(data), "t")
    chunks = chunk_digests(hdr, "t")
    body = data[hdr.data_start :]
    expected = []
    for _, _, begin, end in sorted(hdr.entries.values(), key=lambda e: e[2]):
        expected += [zlib.crc32(body[p : min(end, p + 16384)]) for p in range(begin, end, 16384)]
    assert list(chunks.crcs) == expected  # zlib's CRC-32 of each chunk, chunks never crossing a tensor
    assert int(hdr.metadata["ckptio.crc32"], 16) == zlib.crc32(body)  # the whole-file digest is unchanged
    assert len(expected) == 19 + 5 + 1 + 1 + 1
    loaded = stock_load(data)  # stock readers are unaffected
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    verify_safetensors(io.BytesIO(data), "t")


def test_a_header_whose_chunk_digests_lie_fails_verification_naming_the_bytes():
    data = bytearray(_written(_tensors()))
    at = data.index(b'"ckptio.chunk_crc32":"') + len(b'"ckptio.chunk_crc32":"') + 8 * 3  # chunk 3's digest
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    hdr = read_header(io.BytesIO(bytes(data)), len(data), "t")
    begin, end = chunk_digests(hdr, "t").bounds(3)
    with pytest.raises(ckptio.CorruptCheckpointError, match=rf"digest of data bytes \[{begin}, {end}\) does not"):
        verify_safetensors(io.BytesIO(bytes(data)), "t")
    short = bytes(data).replace(b'"ckptio.chunk_bytes":"16384"', b'"ckptio.chunk_bytes":"08192"')
    with pytest.raises(ckptio.CorruptCheckpointError, match="invalid chunk digests"):
        chunk_digests(read_header(io.BytesIO(short), len(short), "t"), "t")


def _partial_copy(tmp_path, data: bytes, held: list[tuple[int, int]]) -> str:
    path = tmp_path / "entry.partial"
    with open(path, "wb") as f:
        f.truncate(len(data))
        for b, e in held:
            f.seek(b)
            f.write(data[b:e])
    return str(path)


def test_a_partial_copy_reads_only_held_chunks_and_checks_each(tmp_path):
    tensors = _tensors()
    data = _written(tensors)
    hdr = read_header(io.BytesIO(data), len(data), "t")
    _, _, begin, _ = hdr.entries["big"]
    start = hdr.data_start
    # the header, rows 64..191 of "big" rounded out to its chunks, and every tensor but "big" whole
    rows = (start + begin + 64 * 257 * 4 // 16384 * 16384, start + begin + -(-192 * 257 * 4 // 16384) * 16384)
    others = [(start + b, start + e) for k, (_, _, b, e) in hdr.entries.items() if k != "big"]
    held = [(0, start), rows, *others]
    storage = Storage(str(tmp_path))
    path = _partial_copy(tmp_path, data, held)
    loaded, _ = read_weights(storage, "x.safetensors", local_path=path, held=held)
    assert torch.equal(loaded["half"], tensors["half"]) and torch.equal(loaded["scalar"], tensors["scalar"])
    big = loaded["big"]
    assert isinstance(big, StoredTensor) and big.shape == (300, 257)
    assert torch.equal(big.region((64, 0), (128, 257)), tensors["big"][64:192])
    with pytest.raises(ckptio.CheckpointError, match=r"'big' needs data bytes .* not fetched"):
        big.region((0, 0), (65, 257))  # row 0 is not held: never zeros
    with pytest.raises(ckptio.CheckpointError, match="not fetched"):
        big.read()
    with open(path, "r+b") as f:  # one flipped byte in a held chunk of "half"
        f.seek(start + hdr.entries["half"][2] + 100)
        f.write(b"\xff")
    again, _ = read_weights(storage, "x.safetensors", local_path=path, held=held)
    with pytest.raises(ckptio.CorruptCheckpointError, match="do not match their digest"):
        again["half"]


def _asked(s3, since: int) -> list[tuple[int, int]]:  # noqa: F811
    out = []
    for line in s3.requests()[since:]:
        m = re.search(r"^GET /\S+/f\.safetensors\S* range=bytes=(\d+)-(\d+)$", line)
        if m:
            out.append((int(m.group(1)), int(m.group(2)) + 1))
    return out


def test_a_partial_cache_entry_fetches_only_what_it_lacks_and_records_only_checked_pieces(s3, tmp_path):  # noqa: F811
    storage = Storage(f"s3://{s3.make_bucket()}/c", s3.options())
    data = os.urandom(300_000)
    storage.write_bytes("f.safetensors", data)
    cache = NodeCache(str(tmp_path / "cache"))
    cuts = list(range(1000, 300_000, 4096))
    before = len(s3.requests())
    path, held = cache.fetch_ranges(storage, "f.safetensors", [(5000, 9000), (100_000, 100_001)], cuts=cuts)
    assert held == [(1000, 9192), (99304, 103400)]  # widened to the whole chunks around them
    assert sorted(_asked(s3, before)) == held
    assert all(open(path, "rb").read()[b:e] == data[b:e] for b, e in held)
    before = len(s3.requests())
    assert cache.fetch_ranges(storage, "f.safetensors", [(6000, 7000)], cuts=cuts)[1] == held
    assert _asked(s3, before) == []  # held already: nothing asked

    def refuse(start, piece):
        if start <= 200_000 < start + len(piece):
            raise ckptio.CorruptCheckpointError("bad piece")

    with pytest.raises(ckptio.CorruptCheckpointError):
        cache.fetch_ranges(storage, "f.safetensors", [(150_000, 151_000), (200_000, 200_001)], check=refuse, cuts=cuts)
    held = cache.partial(storage, "f.safetensors")[1]
    assert (148_456, 152_552) in held and not any(b <= 200_000 < e for b, e in held)  # the good piece only
    record = json.load(open(path + HELD))
    assert [tuple(r) for r in record["held"]] == held
    # parts that arrive from another node: written and recorded only if every one passes its check
    with pytest.raises(ckptio.CorruptCheckpointError):
        cache.put_ranges(storage, "f.safetensors", [(250_000, data[250_000:251_000]), (200_000, b"x" * 4)], refuse)
    assert cache.partial(storage, "f.safetensors")[1] == held
    assert open(path, "rb").read()[250_000:251_000] == bytes(1000)  # not even written
    got = cache.put_ranges(storage, "f.safetensors", [(250_000, data[250_000:251_000])], refuse)
    assert got == merge_ranges([*held, (250_000, 251_000)]) == cache.partial(storage, "f.safetensors")[1]
    assert open(path, "rb").read()[250_000:251_000] == data[250_000:251_000]
    full = cache.fetch(storage, "f.safetensors")  # a whole copy serves every range from now on
    assert cache.fetch_ranges(storage, "f.safetensors", [(0, 10)])[0] == full
    cache.max_bytes = 0
    cache.evict(keep=full)
    assert not os.path.exists(path) and not os.path.exists(path + HELD)


def _bits(ranges) -> set[int]:
    return {i for b, e in ranges for i in range(b, e)}


def _whole_chunks(ranges, cuts: list[int]) -> set[int]:
    """The bytes of the whole chunks (between consecutive ``cuts``) inside ``ranges``."""
    out = set()
    for b, e in merge_ranges(ranges):
        inside = [c for c in cuts if b <= c <= e]
        if len(inside) >= 2:
            out |= set(range(inside[0], inside[-1]))
    return out


def test_the_fetch_plan_brings_each_node_what_it_lacks_from_one_owner_and_asks_the_store_once():
    """Differential against plain sets of bytes, over random wants and holdings of up to 4 nodes."""
    import random

    from ckptio.cache import RANGE_GAP
    from ckptio.formats import ChunkDigests
    from ckptio.layout import FileChunks
    from ckptio.node_fetch import plan_fetch

    rng = random.Random(0)
    for _ in range(300):
        starts = sorted([*rng.sample(range(1, 3000), 12), 0])
        chunks = FileChunks("f", 3100, 100, ChunkDigests(tuple(starts), (0,) * len(starts), 3000))
        cuts = sorted({0, *chunks.cuts, 3100})
        nodes = rng.randint(1, 4)

        def some(n: int):
            return [(b, min(3100, b + rng.randint(1, 400))) for b in (rng.randrange(100, 3100) for _ in range(n))]

        wants = [{"f": [(0, 100), *some(rng.randint(0, 5))]} for _ in range(nodes)]
        helds = [{"f": [(0, rng.choice([100, 137])), *some(rng.randint(0, 3))]} for _ in range(nodes)]
        need, windows = plan_fetch({"f": chunks}, wants, helds)
        pieces = [p for w in windows for p in w]
        assert all(p.begin in cuts and p.end in cuts for p in pieces)  # whole chunks, checkable on arrival
        assert len(_bits((p.begin, p.end) for p in pieces)) == sum(p.end - p.begin for p in pieces)  # once
        holds = [_whole_chunks(h["f"], cuts) for h in helds]
        for i in range(nodes):
            # what a node wants (widened to whole chunks) and does not hold, it lacks, and some piece brings
            wanted = set(range(100)) | _whole_chunks(
                [(max(c for c in cuts if c <= b), min(c for c in cuts if c >= e)) for b, e in wants[i]["f"][1:]], cuts
            )
            assert _bits(need["f"][i]) == wanted - holds[i]
            assert _bits(need["f"][i]) <= _bits((p.begin, p.end) for p in pieces)
        lacking = set().union(*(_bits(n) for n in need["f"]))
        for p in pieces:
            if p.cached:  # served from the owner's cache: it holds every byte of the piece
                assert set(range(p.begin, p.end)) <= holds[p.owner]
        store = [p for p in pieces if not p.cached]
        asked = _bits((p.begin, p.end) for p in store)
        # the store is asked for what no node holds, and at most gaps shorter than a request between
        assert lacking - set().union(*holds) <= asked
        assert len(asked - (lacking - set().union(*holds))) <= RANGE_GAP * len(store)
        assert all(p.end - p.begin <= 3100 for p in store)
        load = [sum(p.end - p.begin for p in store if p.owner == i) for i in range(nodes)]
        assert max(load) - min(load) <= max((p.end - p.begin for p in store), default=0)  # dealt out evenly
