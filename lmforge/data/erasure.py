"""Reed–Solomon pieces of a file: k data + m parity piece files, any k of which rebuild it.

Why: a token file on one disk is lost with that disk, or silently damaged by one bad sector.
Stored as k + m pieces (on different disks, ideally), any m of them may be lost or corrupt and
nothing is lost: every piece is checked against its sha256 and the file is decoded from k good
ones. The cost is (k + m) / k of the storage (4 + 2: 1.5x), and nothing extra to read while the
data pieces are intact. The coding is zfec's (systematic Reed–Solomon over GF(2^8), k + m <= 256).

Layout of a file `<name>` stored as pieces (no file `<name>` itself):

    <name>.piece000 ..   data piece j (j < k) is bytes [j*L, (j+1)*L) of the file, L = ceil(length / k),
                         the last one zero-padded to L
    .. <name>.piece{k+m-1}  parity pieces, also L bytes each
    <name>.ec.json       sidecar: k, m, stripe, length, piece_length, sha256 of each piece and of
                         the whole file; written last

Coding runs stripe by stripe: stripe s is bytes [s*S, (s+1)*S) of every piece (S = `stripe`), so
encoding, decoding and repair hold about (k + m) * S bytes at a time whatever the file size. As
data pieces are plain slices of the file, an intact one is read in place (memory-mapped); a lost
one is decoded in memory, one stripe at a time, when its bytes are read. Nothing here writes
except `encode_file` and `repair` (temp-then-rename; a repair is verified before it reports).

A piece is good when its sha256 matches the sidecar. Callers that keep (size, mtime)
fingerprints of the pieces (the pack manifest) pass them as `known`, and a piece whose size and
mtime are unchanged is not re-hashed (as lmforge.data.verify does for every pack file); without
them every piece is hashed.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.errors import DataError
from lmforge.data.files import atomic_open, fingerprint, read_json, sha256_file, write_json_atomic

EC_FORMAT = 1
DEFAULT_STRIPE = 1 << 18  # bytes of each piece per coding step: a lost piece costs k of these per decode
_CACHE_STRIPES = 32  # decoded stripes kept per reader (k * stripe bytes each)


def _zfec() -> Any:
    try:
        import zfec
    except ImportError:
        raise DataError("erasure-coded shards need the zfec package: pip install zfec "
                        "(it is in lmforge's `data` extra)") from None
    return zfec


def check_params(k: int, m: int) -> None:
    """k data + m parity pieces: k >= 1, m >= 1, k + m <= 256 (the field GF(2^8) has 256 points)."""
    if not (isinstance(k, int) and isinstance(m, int) and k >= 1 and m >= 1 and k + m <= 256):
        raise DataError(f"erasure k = {k}, m = {m}: need k >= 1 data and m >= 1 parity pieces, k + m <= 256")


def sidecar_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".ec.json")


def piece_names(name: str, n: int) -> list[str]:
    """File names of the n = k + m pieces of the file named `name`, data pieces first."""
    return [f"{name}.piece{i:03d}" for i in range(n)]


@dataclass(frozen=True)
class Layout:
    """What the sidecar records: enough to check every piece and decode the file."""

    k: int
    m: int
    stripe: int
    length: int  # bytes of the original file
    piece_length: int  # bytes of every piece: ceil(length / k)
    sha256: str  # of the original file
    pieces: tuple[str, ...]  # sha256 of each piece, data pieces first

    @property
    def n(self) -> int:
        return self.k + self.m

    def to_json(self) -> dict:
        return {"format": EC_FORMAT, "k": self.k, "m": self.m, "stripe": self.stripe, "length": self.length,
                "piece_length": self.piece_length, "sha256": self.sha256, "pieces": list(self.pieces)}


def read_layout(path: Path | str) -> Layout:
    """The sidecar of the pieced file `path`, checked for consistency; one-line DataError if unusable."""
    side = sidecar_path(path)
    obj = read_json(side)
    if obj is None:
        raise DataError(f"{side}: missing or unreadable, so the pieces of {Path(path).name} cannot be checked; "
                        "repack the data (`lmforge data prepare`)")
    try:
        lay = Layout(k=int(obj["k"]), m=int(obj["m"]), stripe=int(obj["stripe"]), length=int(obj["length"]),
                     piece_length=int(obj["piece_length"]), sha256=str(obj["sha256"]),
                     pieces=tuple(str(h) for h in obj["pieces"]))
        check_params(lay.k, lay.m)
        ok = (obj.get("format") == EC_FORMAT and lay.stripe >= 1 and lay.length >= 0
              and lay.piece_length == -(-lay.length // lay.k) and len(lay.pieces) == lay.n)
    except (KeyError, TypeError, ValueError, DataError) as e:
        raise DataError(f"{side}: not an erasure sidecar written by lmforge ({e.__class__.__name__}: {e}); "
                        "repack the data (`lmforge data prepare`)") from None
    if not ok:
        raise DataError(f"{side}: inconsistent erasure sidecar (format, stripe, lengths or piece count); "
                        "repack the data (`lmforge data prepare`)")
    return lay


def encode_file(src: Path | str, k: int, m: int, stripe: int = DEFAULT_STRIPE) -> Layout:
    """Write the k + m pieces of `src` beside it, then its sidecar (last: its presence means done).
    `src` itself is left alone (the caller removes it when the pieces replace it)."""
    check_params(k, m)
    if stripe < 1:
        raise DataError(f"erasure stripe = {stripe}: must be >= 1 byte")
    src = Path(src)
    zfec = _zfec()
    length = src.stat().st_size
    plen = -(-length // k)
    names = piece_names(src.name, k + m)
    hashes = [hashlib.sha256() for _ in names]
    enc = zfec.Encoder(k, k + m)
    with open(src, "rb") as f, ExitStack() as stack:
        outs = [stack.enter_context(atomic_open(src.with_name(name), "wb")) for name in names]
        for off in range(0, plen, stripe):
            size = min(stripe, plen - off)
            blocks = []
            for j in range(k):
                f.seek(j * plen + off)
                b = f.read(max(0, min(size, length - j * plen - off)))
                blocks.append(b + bytes(size - len(b)))
            for out, h, block in zip(outs, hashes, enc.encode(blocks)):
                out.write(block)
                h.update(block)
    lay = Layout(k=k, m=m, stripe=stripe, length=length, piece_length=plen, sha256=sha256_file(src),
                 pieces=tuple(h.hexdigest() for h in hashes))
    write_json_atomic(sidecar_path(src), lay.to_json())
    return lay


def check_pieces(path: Path | str, layout: Layout, known: dict[str, dict] | None = None) -> dict[int, str]:
    """{piece number: what is wrong} for every missing or corrupt piece of `path` (empty: all good).
    `known` maps piece file names to earlier fingerprints: unchanged size + mtime skip the hash."""
    path = Path(path)
    bad = {}
    for i, name in enumerate(piece_names(path.name, layout.n)):
        p = path.with_name(name)
        if not p.is_file():
            bad[i] = "missing"
        elif (size := p.stat().st_size) != layout.piece_length:
            bad[i] = f"{size} bytes, expected {layout.piece_length}"
        elif fingerprint(p, (known or {}).get(name))["sha256"] != layout.pieces[i]:
            bad[i] = "content differs from its sha256 (corrupt)"
    return bad


def describe_bad(path: Path | str, bad: dict[int, str]) -> str:
    """'train.bin.piece001 missing, train.bin.piece004 content differs ...' for a log or error line
    (number -1: the decoded file as a whole)."""
    name = Path(path).name
    return ", ".join(f"{name if i < 0 else piece_names(name, i + 1)[i]} {why}" for i, why in sorted(bad.items()))


def _too_many(path: Path, layout: Layout, bad: dict[int, str]) -> DataError:
    return DataError(f"{path}: cannot rebuild: {len(bad)} of its {layout.n} erasure pieces are missing or corrupt "
                     f"({describe_bad(path, bad)}); decoding needs {layout.k} good pieces and only "
                     f"{layout.n - len(bad)} are left; repack the data (`lmforge data prepare`)")


class ErasureReader:
    """Read-only random access to the bytes of a pieced file: intact data pieces are read in place,
    a missing or corrupt one is decoded stripe by stripe from k good pieces (a few decoded stripes
    are cached). Raises DataError when more than m pieces are bad. Safe to share between threads."""

    def __init__(self, path: Path | str, known: dict[str, dict] | None = None):
        self.path = Path(path)
        self.layout = lay = read_layout(self.path)
        self.bad = check_pieces(self.path, lay, known)
        if len(self.bad) > lay.m:
            raise _too_many(self.path, lay, self.bad)
        names = piece_names(self.path.name, lay.n)
        good = [i for i in range(lay.n) if i not in self.bad]
        self._maps = {i: np.memmap(self.path.with_name(names[i]), dtype=np.uint8, mode="r")
                      for i in good if lay.piece_length}
        self._sources = tuple(good[:lay.k])  # data pieces first: fewest parity symbols to solve for
        self._decoder = _zfec().Decoder(lay.k, lay.n) if any(j < lay.k for j in self.bad) else None
        self._cache: OrderedDict[int, list[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.layout.length

    def _stripe(self, s: int) -> list[bytes]:
        """The k data blocks of stripe s, decoded from the source pieces."""
        with self._lock:
            blocks = self._cache.get(s)
            if blocks is not None:
                self._cache.move_to_end(s)
                return blocks
        lay = self.layout
        lo, hi = s * lay.stripe, min((s + 1) * lay.stripe, lay.piece_length)
        blocks = list(self._decoder.decode([self._maps[i][lo:hi].tobytes() for i in self._sources],
                                           list(self._sources)))
        with self._lock:
            self._cache[s] = blocks
            while len(self._cache) > _CACHE_STRIPES:
                self._cache.popitem(last=False)
        return blocks

    def _piece_bytes(self, j: int, lo: int, hi: int) -> bytes:
        if j not in self.bad:
            return self._maps[j][lo:hi].tobytes()
        S = self.layout.stripe
        parts = []
        for s in range(lo // S, (hi - 1) // S + 1):
            block = self._stripe(s)[j]
            parts.append(block[max(lo - s * S, 0):min(hi - s * S, len(block))])
        return b"".join(parts)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of the original file (fewer at its end)."""
        lay = self.layout
        pos, end = max(0, offset), min(offset + size, lay.length)
        parts = []
        while pos < end:
            j, lo = divmod(pos, lay.piece_length)
            hi = min(lay.piece_length, lo + end - pos)
            parts.append(self._piece_bytes(j, lo, hi))
            pos += hi - lo
        return b"".join(parts)

    def chunks(self, size: int = 1 << 22) -> Iterator[bytes]:
        """The whole original file, in order, `size` bytes at a time."""
        for off in range(0, self.layout.length, size):
            yield self.read(off, size)

    def sha256(self) -> str:
        """Of the whole decoded file (compare with `layout.sha256`)."""
        h = hashlib.sha256()
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()

    def view(self, dtype: np.dtype | str) -> TypedView:
        return TypedView(self, np.dtype(dtype))


class TypedView:
    """The decoded file as a read-only 1-D array of `dtype` that supports `len` and slices `[a:b]`
    (what the loader and the deep verify use of a memory map)."""

    def __init__(self, reader: ErasureReader, dtype: np.dtype):
        self.reader, self.dtype = reader, dtype
        self.n = len(reader) // dtype.itemsize

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("a pieced file is read by slices [a:b]")
        start, stop, step = key.indices(self.n)
        if step != 1:
            raise TypeError("a pieced file is read by contiguous slices")
        stop = max(start, stop)
        size = self.dtype.itemsize
        return np.frombuffer(self.reader.read(start * size, (stop - start) * size), dtype=self.dtype)


def verify_file(path: Path | str, known: dict[str, dict] | None = None) -> dict[int, str]:
    """Bad pieces of `path` as `check_pieces`; when the file is still decodable, also decodes it
    whole and checks the sha256 of the original (reported as piece -1). DataError over m bad."""
    reader = ErasureReader(path, known)
    bad = dict(reader.bad)
    if reader.sha256() != reader.layout.sha256:
        bad[-1] = f"decoded content differs from the file's sha256 in {sidecar_path(path).name}"
    return bad


def repair(path: Path | str, known: dict[str, dict] | None = None) -> list[str]:
    """Rewrite every missing or corrupt piece of `path` from k good ones (temp-then-rename), then
    re-hash all pieces. Returns the names of the rewritten pieces (empty: nothing to do)."""
    path = Path(path)
    lay = read_layout(path)
    bad = check_pieces(path, lay, known)
    if not bad:
        return []
    if len(bad) > lay.m:
        raise _too_many(path, lay, bad)
    zfec = _zfec()
    names = piece_names(path.name, lay.n)
    todo = tuple(sorted(bad))
    sources = [i for i in range(lay.n) if i not in bad][:lay.k]
    maps = {i: np.memmap(path.with_name(names[i]), dtype=np.uint8, mode="r") for i in sources if lay.piece_length}
    dec, enc = zfec.Decoder(lay.k, lay.n), zfec.Encoder(lay.k, lay.n)
    hashes = {i: hashlib.sha256() for i in todo}
    with ExitStack() as stack:
        outs = {i: stack.enter_context(atomic_open(path.with_name(names[i]), "wb")) for i in todo}
        for lo in range(0, lay.piece_length, lay.stripe):
            hi = min(lo + lay.stripe, lay.piece_length)
            data = dec.decode([maps[i][lo:hi].tobytes() for i in sources], sources)
            for i, block in zip(todo, enc.encode(data, todo)):
                outs[i].write(block)
                hashes[i].update(block)
        wrong = [names[i] for i in todo if hashes[i].hexdigest() != lay.pieces[i]]
        if wrong:  # raised inside the block: no temp file is renamed into place
            raise DataError(f"{path}: rebuilt {', '.join(wrong)} do not match the sha256 in {sidecar_path(path).name}; "
                            "nothing was replaced; the sources may be damaged too: repack the data")
    still = check_pieces(path, lay)
    if still:
        raise DataError(f"{path}: after repair, {describe_bad(path, still)}; check the disk and repack the data")
    return [names[i] for i in todo]
