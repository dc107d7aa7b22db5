"""Work units: a shard is a contiguous, chunk-aligned range of manifest rows and the images in it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first row of its Zarr region (== index * shard_size)
    stop: int  # one past the last row of its region
    rows: tuple[int, ...]  # manifest rows in [start, stop) to score (gaps are allowed)
    image_ids: tuple[str, ...]
    paths: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Shard(index={self.index}, rows=[{self.start}, {self.stop}), images={len(self.rows)})"

    @property
    def digest(self) -> str:
        """Identity of the work: a completion record only counts if this still matches."""
        h = hashlib.sha256(f"{self.start}:{self.stop}".encode())
        for r, i, p in zip(self.rows, self.image_ids, self.paths):
            h.update(f"\x1e{r}\x1f{i}\x1f{p}".encode())
        return h.hexdigest()[:16]


def plan_shards(manifest: pa.Table, shard_size: int, n_rows: int, limit: int | None = None) -> list[Shard]:
    """Split manifest rows into shards aligned to multiples of shard_size (the Zarr chunk length)."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    t = manifest.select(["row", "image_id", "path"]).sort_by("row")
    if limit is not None:
        t = t.slice(0, limit)
    rows = t.column("row").to_pylist()
    ids = t.column("image_id").to_pylist()
    paths = t.column("path").to_pylist()
    shard_of = pc.divide(t.column("row"), pa.scalar(shard_size, pa.int64())).to_pylist() if t.num_rows else []
    shards: list[Shard] = []
    i = 0
    while i < len(rows):
        k = shard_of[i]
        j = i
        while j < len(rows) and shard_of[j] == k:
            j += 1
        start = k * shard_size
        shards.append(Shard(k, start, min(start + shard_size, n_rows), tuple(rows[i:j]), tuple(ids[i:j]), tuple(paths[i:j])))
        i = j
    return shards
