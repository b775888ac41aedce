"""A sharded resume on several nodes: the store sends each byte once, and each node caches what its ranks read.

On N nodes each node's ranks read 1/N of every tensor, scattered through the file: fetched by each
node on its own, that is one small ranged read per tensor per node, and a store's cost per request
(not per byte) sets the time. Instead every rank computes the same plan from what every node wants
and already holds. The bytes some node lacks are cut into large pieces (whole chunks), each owned
by one node: a node that holds a piece already serves it from its cache; the other pieces are
dealt out evenly and fetched with concurrent ranged reads. Each node's first rank then sends every
other node the parts of its pieces that node's ranks read (point to point, on the gloo group), and
writes into its cache what its own ranks read, every chunk checked against its digest first.

The work runs in windows of bounded size, so a node holds at most a window's pieces in memory, and
every window ends in an agreement: a fetch that fails on one node fails every rank, typed, and
nothing enters a cache that was not wholly received and checked.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import ranks
from .cache import RANGE_GAP, RANGE_PIECE, RANGE_WORKERS, NodeCache, cut_pieces, exact, widen_ranges
from .errors import CheckpointError, typed_io
from .layout import FileChunks, Want, cache_headers, file_chunks, header_bytes, put_header_bytes, wanted_ranges
from .storage import FileInfo, Storage, intersect_ranges, merge_ranges, subtract_ranges

__all__ = ["Piece", "fetch_for_nodes", "plan_fetch"]

log = logging.getLogger("ckptio")

Ranges = list[tuple[int, int]]
# bytes of pieces a window holds per node: every worker busy with a full piece
WINDOW_PER_NODE = RANGE_WORKERS * RANGE_PIECE
MIN_PIECE = 2 << 20


@dataclass(frozen=True)
class Piece:
    """Bytes ``[begin, end)`` of ``file``: node ``owner`` reads them (from its cache where ``cached``, else the store)."""

    file: str
    begin: int
    end: int
    owner: int
    cached: bool


def _inner(ranges: Ranges, points: Sequence[int]) -> Ranges:
    """``ranges`` shrunk to the ``points`` within them: only whole chunks of what a node holds count."""
    out = []
    for begin, end in ranges:
        b = points[bisect.bisect_left(points, begin)] if begin <= points[-1] else end
        e = points[bisect.bisect_right(points, end) - 1]
        if b < e:
            out.append((b, e))
    return out


def plan_fetch(
    files: Mapping[str, FileChunks], wants: Sequence[Mapping[str, Ranges]], helds: Sequence[Mapping[str, Ranges]]
) -> tuple[dict[str, list[Ranges]], list[list[Piece]]]:
    """What each node lacks (by file, by node) and the pieces that bring it, in windows; the same on every rank.

    ``wants[i]`` and ``helds[i]``: node ``i``'s wanted and held byte ranges by file.
    """
    nodes = len(wants)
    need: dict[str, list[Ranges]] = {}
    pieces: list[Piece] = []
    load = [0] * nodes
    for file, chunks in files.items():
        cuts, size = chunks.cuts, chunks.size
        points = [0, *cuts, size]
        held = [_inner(merge_ranges(h.get(file, [])), points) for h in helds]
        need[file] = [
            subtract_ranges(widen_ranges(merge_ranges(w.get(file, [])), cuts, size), held[i])
            for i, w in enumerate(wants)
        ]
        lacking = merge_ranges(r for lacks in need[file] for r in lacks)
        # what no node holds comes from the store, read across gaps that cost less than another request
        store = merge_ranges(subtract_ranges(lacking, merge_ranges(r for h in held for r in h)), RANGE_GAP)
        rest = subtract_ranges(lacking, store)
        for i in range(nodes):  # the rest some node holds: it comes from that node
            mine = intersect_ranges(rest, held[i])
            pieces += [Piece(file, b, e, i, True) for b, e in cut_pieces(mine, cuts, size)]
            rest = subtract_ranges(rest, mine)
        # pieces small enough to keep every node's workers busy, large enough that requests stay few
        piece_bytes = min(RANGE_PIECE, max(MIN_PIECE, sum(e - b for b, e in store) // (nodes * RANGE_WORKERS)))
        for b, e in cut_pieces(store, cuts, size, piece_bytes):  # dealt out evenly
            owner = min(range(nodes), key=lambda i: (load[i], i))
            load[owner] += e - b
            pieces.append(Piece(file, b, e, owner, False))
    order = {file: k for k, file in enumerate(files)}
    pieces.sort(key=lambda p: (order[p.file], p.begin))
    windows: list[list[Piece]] = []
    budget, used = WINDOW_PER_NODE * nodes, 0
    for piece in pieces:
        if not windows or used + piece.end - piece.begin > budget:
            windows.append([])
            used = 0
        windows[-1].append(piece)
        used += piece.end - piece.begin
    return need, windows


def _parts(pieces: Sequence[Piece], need: Mapping[str, list[Ranges]], node: int) -> list[tuple[Piece, int, int]]:
    """The parts of ``pieces`` that ``node`` lacks, in piece order: what travels to it, and in what order."""
    out = []
    for p in pieces:
        lacks = need[p.file][node]  # sorted and disjoint: start from the last range beginning before the piece
        k = max(0, bisect.bisect_right(lacks, (p.begin, math.inf)) - 1)
        while k < len(lacks) and lacks[k][0] < p.end:
            b, e = max(lacks[k][0], p.begin), min(lacks[k][1], p.end)
            if b < e:
                out.append((p, b, e))
            k += 1
    return out


def _obtain(
    storage: Storage, cache: NodeCache, files: Mapping[str, FileChunks], pieces: Sequence[Piece], infos: Mapping
) -> dict:
    """This node's pieces' bytes: from its cache where it holds them, else from the store, each chunk checked."""
    paths = {p.file: cache.holding(storage, p.file, infos[p.file])[0] for p in pieces if p.cached}

    def one(p: Piece) -> bytes:
        if p.cached:
            with open(paths[p.file], "rb") as f:
                data = os.pread(f.fileno(), p.end - p.begin, p.begin)
        else:
            data = storage.read_range(p.file, p.begin, p.end)
        files[p.file].check(p.begin, exact(data, p.begin, p.end, storage.url(p.file)))
        return data

    with concurrent.futures.ThreadPoolExecutor(RANGE_WORKERS, thread_name_prefix="ckptio-range") as pool:
        futures = {p: pool.submit(one, p) for p in pieces}
        try:
            return {p: f.result() for p, f in futures.items()}
        finally:
            for f in futures.values():
                f.cancel()  # after a failure, what has not started never starts


def _share(
    storage: Storage,
    cache: NodeCache,
    files: Mapping[str, FileChunks],
    need: Mapping[str, list[Ranges]],
    pieces: Sequence[Piece],
    data: Mapping[Piece, bytes],
    me: int,
    fetchers: Sequence[int],
    infos: Mapping,
) -> None:
    """Node ``me``'s fetching rank: send each other node its parts of this node's pieces, receive and cache its own."""
    owned = [[p for p in pieces if p.owner == k] for k in range(len(fetchers))]
    sends: dict[int, list[memoryview]] = {}
    views: dict[tuple[tuple[Piece, int, int], ...], list[memoryview]] = {}  # nodes lacking the same parts share them
    for n in range(len(fetchers)):
        if n != me:
            parts = tuple(_parts(owned[me], need, n))
            if parts not in views:
                views[parts] = [memoryview(data[p])[b - p.begin : e - p.begin] for p, b, e in parts]
            sends[fetchers[n]] = views[parts]
    incoming = {k: _parts(owned[k], need, me) for k in range(len(fetchers)) if k != me}
    got = ranks.exchange(sends, {fetchers[k]: sum(e - b for _, b, e in parts) for k, parts in incoming.items()})
    by_file: dict[str, list[tuple[int, bytes | memoryview]]] = {}
    for p, b, e in _parts(owned[me], need, me):
        by_file.setdefault(p.file, []).append((b, memoryview(data[p])[b - p.begin : e - p.begin]))
    for k, parts in incoming.items():
        at, payload = 0, memoryview(got.get(fetchers[k], b""))
        for p, b, e in parts:
            by_file.setdefault(p.file, []).append((b, payload[at : at + e - b]))
            at += e - b
    for file, received in by_file.items():
        cache.put_ranges(storage, file, received, files[file].check, infos[file])


def _stat_files(storage: Storage, name: str, cache: NodeCache) -> tuple[dict[str, FileInfo], dict[str, bytes]]:
    """Master: the checkpoint's tensor files' stats, and the leading bytes that hold their headers."""
    infos: dict[str, FileInfo] = {}
    cache_headers(storage, name, cache, infos)
    return infos, {f: header_bytes(storage, f, cache, info) for f, info in infos.items()}


def fetch_for_nodes(storage: Storage, name: str, cache: NodeCache, want: Want | None) -> dict[str, FileInfo]:
    """Every rank: each node's cache gets the byte ranges its ranks read (they say which; ``want`` None: every
    byte, for a replicated model); the store sends each once.

    ``storage`` may be the master's local disk: the master's node then holds every byte, and the other
    nodes get theirs from it (a node whose disk holds the same files, a run directory they share, fetches
    nothing). Returns the stats of the files it fetched from: they name the cache entries that hold the ranges."""
    rank = ranks.rank_info()
    source = storage.url(name)
    with typed_io(source, "fetching headers into the node cache"):
        # one stat and one header read per file in the whole job (on a store, each is a request): the master's,
        # sent to every other node's first rank, which puts the headers in its node's cache
        infos, heads = ranks.master_result(lambda: _stat_files(storage, name, cache))
        ranks.together(
            lambda: [put_header_bytes(storage, f, cache, infos[f], data) for f, data in heads.items()],
            here=rank.is_local_master and not rank.is_master,
        )

    def local() -> tuple[str, dict, dict | None]:
        wanted = wanted_ranges(storage, name, cache, want, infos)
        held = {f: cache.holding(storage, f, infos[f])[1] for f in wanted} if rank.is_local_master else None
        return ranks.node_id(), wanted, held

    with typed_io(source, "reading headers from the node cache"):
        everyone = ranks.gather_results(local)
    nodes: list[str] = []
    fetchers: list[int] = []
    wants: list[dict[str, Ranges | None]] = []
    helds: list[dict[str, Ranges]] = []
    for r, (node, wanted, held) in enumerate(everyone):
        if node not in nodes:
            nodes.append(node)
            fetchers.append(r)
            wants.append({})
            helds.append({})
        i = nodes.index(node)
        if held is not None:  # the node's first rank fetches and holds for it
            fetchers[i], helds[i] = r, held
        for file, ranges in wanted.items():
            known = wants[i].get(file, [])
            wants[i][file] = None if ranges is None or known is None else known + ranges
    me = nodes.index(ranks.node_id())
    fetching = fetchers[me] == rank.rank
    whole = sorted({f for w in wants for f, r in w.items() if r is None})  # files without chunk digests

    def fetch_whole(file: str) -> None:
        if cache.holding(storage, file, infos[file])[1] == [(0, infos[file].size)]:
            return
        if storage.is_local:
            raise CheckpointError(
                f"{storage.url(file)}: is on the master's node only, and has no chunk digests (an older ckptio wrote "
                "it) to check its bytes on the way to this node: resume from a run directory every node shares, "
                "or from the remote copy"
            )
        cache.fetch(storage, file)

    with typed_io(source, "fetching this node's ranges into the node cache"):
        ranks.together(lambda: [fetch_whole(f) for f in whole], here=fetching)
        files = {f: file_chunks(storage, f, cache, infos[f]) for f in wants[me] if f not in whole}
        need, windows = plan_fetch(files, wants, helds)  # type: ignore[arg-type]
        error: BaseException | None = None
        for pieces in windows:
            data: dict = {}
            try:
                if fetching and error is None:
                    mine = [p for p in pieces if p.owner == me]
                    data = _obtain(storage, cache, files, mine, infos)  # type: ignore[arg-type]
            except Exception as e:
                error = e
            # every rank stops together: no node sends, or waits for, parts of a window that failed anywhere
            ranks.raise_together(error)
            try:
                if fetching:
                    _share(storage, cache, files, need, pieces, data, me, fetchers, infos)  # type: ignore[arg-type]
            except Exception as e:
                error = e  # raised, on every rank, at the next agreement
        ranks.raise_together(error)
    log.info("%s: node %d of %d fetched %d bytes in %d pieces", source, me, len(nodes),
             sum(p.end - p.begin for w in windows for p in w if p.owner == me and not p.cached),
             sum(1 for w in windows for p in w if p.owner == me and not p.cached))  # fmt: skip
    return infos
