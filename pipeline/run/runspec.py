"""What every shard task needs to know about its run. Small, frozen, picklable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.inference.images import PreprocessConfig, ReadLimits
from pipeline.inference.model import ModelSpec
from pipeline.store.storage import join


@dataclass(frozen=True)
class RunSpec:
    out: str
    model: ModelSpec
    model_version: str
    baselines: tuple[float, ...]
    preprocess: PreprocessConfig = PreprocessConfig()
    batch_size: int = 32
    device: str = "cpu"
    shard_size: int = 1024
    n_rows: int = 0
    grid: tuple[int, int] = (7, 7)
    embedding_dim: int = 1024
    decode_threads: int | None = None  # None: one per core of the worker
    torch_threads: int | None = None  # None: the worker's cores / its task threads
    storage_options: tuple[tuple[str, str], ...] = field(default=())
    cache_url: str | None = None  # the cache group for this preprocessing config; None: no cache
    precision: str = "fp32"  # pipeline.inference.precision: fp32 | tf32 | bf16 (part of the identity)
    decode_workers: int | None = None  # decode processes per worker; None: one per core of the worker
    read_limits: ReadLimits = ReadLimits()  # bounds per film (not identity: they never change pixels)

    @property
    def run_url(self) -> str:
        return join(self.out, "runs", self.model_version)

    @property
    def maps_url(self) -> str:
        return join(self.run_url, "maps.zarr")

    def part_url(self, shard_index: int) -> str:
        return join(self.run_url, "predictions", f"part-{shard_index:06d}.parquet")

    def record_url(self, shard_index: int) -> str:
        return join(self.run_url, "_shards", f"shard-{shard_index:06d}.json")

    def output_identity(self) -> dict:
        """What makes two runs' outputs comparable; a rerun into the same run dir must match it."""
        return {
            "model_version": self.model_version,
            "findings": list(self.model.findings),
            "baselines": list(self.baselines),
            "preprocess": asdict(self.preprocess),
            "shard_size": self.shard_size,
            "grid": list(self.grid),
            "embedding_dim": self.embedding_dim,
            "precision": self.precision,
        }
