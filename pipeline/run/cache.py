"""Preprocessed-image cache: uint8 224x224x3 pixels (before normalisation) in Zarr, indexed by
manifest row, one group per preprocessing configuration.

It cannot serve wrong pixels:
* every entry carries a content key of the source file (size + BLAKE2b of the bytes read), so a
  replaced file is a miss even with the same size and mtime (``cp -p``, ``rsync -a``, tar). A hit
  still reads the file's bytes, but hashing them costs well under a millisecond where decoding costs
  ~13 ms: the cache skips decode, not I/O;
* one chunk per row, so no two tasks ever write one chunk, whatever shard sizes filled it;
* a key is cleared before its pixels are rewritten and set after, so a crash can only cause a miss.
A changed preprocessing configuration uses another group altogether."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import zarr

from pipeline.core.errors import ImageError, OutputError
from pipeline.inference.images import Decoded, PreprocessConfig, ReadLimits, decode_bytes, read_bytes
from pipeline.store.maps_store import open_maps
from pipeline.core.redact import redact
from pipeline.store.storage import join

CACHE_FORMAT = 2  # 2: content keys, one chunk per row (format 1 could mix shards' writes)
CACHE_CHUNK = 1  # rows per chunk: a task only ever writes the chunks of its own rows


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

    def key(self, row: int) -> str | None:
        """The content key stored for this row (None: nothing cached), for decode processes to compare."""
        return str(self.keys[row - self.start]).partition("|")[2] or None

    def get(self, row: int, key: str):
        i = row - self.start
        mode, _, stored = str(self.keys[i]).partition("|")
        return (self.g["pixels"][row], mode) if stored == key else None

    def put(self, row: int, key: str, pixels: np.ndarray, mode: str) -> None:
        self.new[row] = (key, pixels, mode)

    def flush(self) -> None:
        # clear the key, write the pixels, then the key: a crash anywhere leaves a key that can only miss
        for row in sorted(self.new):
            if self.keys[row - self.start]:
                self.g["key"][row] = ""
        for row, (_, pixels, _) in sorted(self.new.items()):
            self.g["pixels"][row] = pixels
        for row, (key, _, mode) in sorted(self.new.items()):
            self.g["key"][row] = f"{mode}|{key}"
        self.new.clear()
