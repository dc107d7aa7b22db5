"""Preprocessed-image cache: uint8 224x224x3 pixels (before normalisation) in Zarr, indexed by
manifest row, one group per preprocessing configuration.

It cannot serve wrong pixels:
* every entry carries a content key of the source file (size + BLAKE2b of the bytes read), so a
  replaced file is a miss even with the same size and mtime (``cp -p``, ``rsync -a``, tar). A hit
  still reads the file's bytes, but hashing them costs well under a millisecond where decoding costs
  ~13 ms: the cache skips decode, not I/O;
* one chunk per row, so no two tasks ever write one chunk, whatever shard sizes filled it;
* a key is cleared before its pixels are rewritten and set after, so a crash can only cause a miss;
* every entry carries a digest of its decoded pixels (BLAKE2b), checked on every read: pixels
  changed on disk (chunks swapped between rows, a flipped byte that zstd decompresses without
  complaint) are a miss, logged, and the film is decoded again; ``jobs.runs --check --verify``
  checks every entry (``verify_cache``).
A changed preprocessing configuration uses another group altogether."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict

import numpy as np
import zarr

from pipeline.core.errors import ImageError, OutputError
from pipeline.inference.images import Decoded, PreprocessConfig, decode_bytes
from pipeline.io.reads import ReadLimits, read_bytes
from pipeline.store.maps_store import open_maps
from pipeline.core.redact import redact
from pipeline.io.fs import join

CACHE_FORMAT = 3  # 3: a digest of the pixels per entry; 2: content keys, one chunk per row (format 1 could mix shards' writes)
CACHE_CHUNK = 1  # rows per chunk: a task only ever writes the chunks of its own rows
PIXELS_MARK = "|px:"  # a stored key is "<PIL mode>|<content key>|px:<digest of the pixels>"

log = logging.getLogger(__name__)


def pixel_digest(pixels: np.ndarray) -> str:
    """BLAKE2b-128 of the decoded pixels (shape and bytes): what a cache entry must give back."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    return hashlib.blake2b(repr(a.shape).encode() + a.tobytes(), digest_size=16).hexdigest()


def _split(stored: str) -> tuple[str, str, str]:
    """A stored key -> (PIL mode, content key, pixel digest); empty strings when absent."""
    mode, _, rest = str(stored).partition("|")
    key, _, digest = rest.rpartition(PIXELS_MARK)
    return (mode, key, digest) if key else (mode, "", "")


def config_key(pre: PreprocessConfig) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **pre.identity()}, sort_keys=True).encode()).hexdigest()[:16]


def cache_group_url(cache_url: str, pre: PreprocessConfig) -> str:
    return join(cache_url, config_key(pre))


def content_key(path: str, data: bytes) -> str:
    """path|size|BLAKE2b-128 of the bytes: changes whenever the content does, whatever the mtime.
    The path is stored redacted (the key lives in the cache)."""
    return f"{redact(path)}|{len(data)}|b2:{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def cached_decode(path: str, row: int, pre: PreprocessConfig, storage_options: dict, cache: "ShardCache | None",
                  limits: ReadLimits = ReadLimits()):
    """(Decoded | ImageError, content key or None, hit): read the bytes once (bounded, retried),
    serve cached pixels when their content key matches, else decode."""
    try:
        data = read_bytes(path, storage_options, limits)
    except ImageError as e:
        return e, None, False
    key = content_key(path, data) if cache is not None else None
    if cache is not None:
        hit = cache.get(row, key)
        if hit is not None:
            return Decoded(hit[0], hit[1]), key, True
    try:
        return decode_bytes(data, pre, limits), key, False
    except ImageError as e:
        return e, key, False


def create_cache(cache_url: str, pre: PreprocessConfig, n_rows: int, shard_size: int, storage_options: dict | None = None) -> str:
    url = cache_group_url(cache_url, pre)
    g = open_maps(url, "a", storage_options)
    chunk = CACHE_CHUNK  # independent of shard_size: any mix of shard sizes and workers is safe
    specs = {"pixels": ((n_rows, pre.size, pre.size, 3), (chunk, pre.size, pre.size, 3), "uint8", 0),
             "key": ((n_rows,), (chunk,), str, "")}  # key: "<PIL mode>|<content key>"
    for name, (shape, chunks, dtype, fill) in specs.items():
        if name in g:
            arr = g[name]
            if arr.shape[0] < n_rows:
                arr.resize(shape)
            continue
        g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
    g.attrs.update({"preprocess": asdict(pre), "format": CACHE_FORMAT})
    return url


class ShardCache:
    """A shard's rows of the cache: keys read once, pixels read per hit, new entries written at
    flush, row by row (each row is its own chunk)."""

    def __init__(self, url: str, start: int, stop: int, storage_options: dict | None = None):
        self.g: zarr.Group = open_maps(url, "r+", storage_options)
        if self.g["pixels"].chunks[0] != CACHE_CHUNK:  # never write into another layout's chunks
            raise OutputError(f"cache {url} has chunks of {self.g['pixels'].chunks[0]} rows, not {CACHE_CHUNK}; delete it or pass --cache none")
        self.start, self.stop = start, stop
        self.keys = np.asarray(self.g["key"][start:stop], dtype=object)
        self.new: dict[int, tuple[str, np.ndarray, str]] = {}
        self.corrupted = 0  # entries whose pixels failed their digest (re-decoded)

    def key(self, row: int) -> str | None:
        """The content key stored for this row (None: nothing cached), for decode processes to compare."""
        return _split(self.keys[row - self.start])[1] or None

    def get(self, row: int, key: str):
        """(pixels, mode) when the row holds this content key and pixels that match their digest;
        None otherwise (a corrupted entry is logged, and the caller decodes the film again)."""
        mode, stored, digest = _split(self.keys[row - self.start])
        if stored != key:
            return None
        try:
            pixels = self.g["pixels"][row]
        except Exception:  # noqa: BLE001 - a chunk that no longer decompresses is one more corrupted entry
            pixels = None
        if pixels is None or pixel_digest(pixels) != digest:
            log.warning("cache row %d: the pixels on disk differ from their digest (a corrupted or swapped chunk); "
                        "decoding the film again", row)
            self.corrupted += 1
            return None
        return pixels, mode

    def put(self, row: int, key: str, pixels: np.ndarray, mode: str) -> None:
        self.new[row] = (key, pixels, mode)

    def flush(self) -> None:
        # clear the key, write the pixels, then the key: a crash anywhere leaves a key that can only miss
        for row in sorted(self.new):
            if self.keys[row - self.start]:
                self.g["key"][row] = ""
        for row, (_, pixels, _) in sorted(self.new.items()):
            self.g["pixels"][row] = pixels
        for row, (key, pixels, mode) in sorted(self.new.items()):
            self.g["key"][row] = f"{mode}|{key}{PIXELS_MARK}{pixel_digest(pixels)}"
        self.new.clear()


def verify_cache(url: str, storage_options: dict | None = None) -> list[str]:
    """Every entry of one cache group against its pixel digest (``jobs.runs --check --verify``):
    one line per bad entry. Reads the whole group; writes nothing."""
    g = open_maps(url, "r", storage_options)
    if g.attrs.get("format") != CACHE_FORMAT or "key" not in g or "pixels" not in g:
        return []  # another format: never served by this version
    keys = g["key"][:]
    problems = []
    for row in np.flatnonzero([bool(k) for k in keys]):
        mode, key, digest = _split(keys[row])
        try:
            pixels = g["pixels"][int(row)]
        except Exception:  # noqa: BLE001 - a chunk that no longer decompresses
            pixels = None
        if not key or pixels is None or pixel_digest(pixels) != digest:
            problems.append(f"row {int(row)}: pixels differ from their digest (the next run decodes the film again)")
    return problems


def source_digest(content_key: str) -> str:
    """A film's size and digest from its content key (``pipeline.worker.cache.content_key``: the path
    is the manifest's own)."""
    return "|".join(content_key.rsplit("|", 2)[-2:])


def changed_sources(rec, shard, spec) -> list[str]:
    """--verify: the films a shard scored (``rec``: its ShardRecord), read again and compared with what
    it scored (a film replaced under the same name since). Records written before they kept this have
    nothing to compare."""
    sources = rec.sources
    for row, path in zip(shard.rows, shard.paths):
        want = sources.get(str(row))
        if want is None:
            continue
        try:
            got = source_digest(content_key(path, read_bytes(path, spec.inputs.options_for(path), spec.read_limits)))
        except ImageError:
            got = None
        if got != want:
            return [f"film {redact(path)} (row {row}) changed since it was scored"]
    return []
