"""Preprocessed-image cache: uint8 224x224x3 pixels (before normalisation) in Zarr, indexed by
manifest row, one group per preprocessing configuration. Each entry carries the key of the source
file it came from (path, size, modification time), so a changed file is a miss, never stale pixels;
a changed preprocessing configuration uses another group altogether."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

import numpy as np
import zarr

from .images import PreprocessConfig, ReadLimits, source_info
from .maps_store import open_maps
from .redact import redact
from .storage import join

CACHE_FORMAT = 1
CACHE_CHUNK = 64  # rows per chunk (a divisor of the shard size keeps each shard's region its own)


def config_key(pre: PreprocessConfig) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **asdict(pre)}, sort_keys=True).encode()).hexdigest()[:16]


def cache_group_url(cache_url: str, pre: PreprocessConfig) -> str:
    return join(cache_url, config_key(pre))


def source_key(path: str, storage_options: dict | None = None, limits: ReadLimits = ReadLimits()) -> str:
    """path|size|mtime (or ETag on object stores): changes whenever the file's content may have.
    The path is stored redacted (the key lives in the cache); the info call is bounded by limits."""
    info = source_info(path, storage_options, limits)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or ""
    return f"{redact(path)}|{info.get('size')}|{stamp}"


def create_cache(cache_url: str, pre: PreprocessConfig, n_rows: int, shard_size: int, storage_options: dict | None = None) -> str:
    url = cache_group_url(cache_url, pre)
    g = open_maps(url, "a", storage_options)
    chunk = math.gcd(shard_size, CACHE_CHUNK)
    specs = {"pixels": ((n_rows, pre.size, pre.size, 3), (chunk, pre.size, pre.size, 3), "uint8", 0),
             "key": ((n_rows,), (chunk,), str, ""), "mode": ((n_rows,), (chunk,), str, "")}
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
    """A shard's region of the cache: read once, updated in memory, written back once."""

    def __init__(self, url: str, start: int, stop: int, storage_options: dict | None = None):
        self.g: zarr.Group = open_maps(url, "r+", storage_options)
        self.start, self.stop = start, stop
        self.pixels = self.g["pixels"][start:stop]
        self.keys = np.asarray(self.g["key"][start:stop], dtype=object)
        self.modes = np.asarray(self.g["mode"][start:stop], dtype=object)
        self.dirty = False

    def get(self, row: int, key: str):
        i = row - self.start
        return (self.pixels[i], self.modes[i]) if self.keys[i] == key else None

    def put(self, row: int, key: str, pixels: np.ndarray, mode: str) -> None:
        i = row - self.start
        self.pixels[i], self.keys[i], self.modes[i] = pixels, key, mode
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            # pixels before keys: a crash between the two leaves old keys, which can only miss
            self.g["pixels"][self.start:self.stop] = self.pixels
            self.g["mode"][self.start:self.stop] = self.modes.astype(str)
            self.g["key"][self.start:self.stop] = self.keys.astype(str)
