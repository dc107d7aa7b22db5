"""What every shard task needs to know about its run. Small, frozen, picklable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.inference.images import PreprocessConfig, ReadLimits
from pipeline.inference.model import ModelSpec
from pipeline.store.layout import OutputStore


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
    def store(self) -> OutputStore:
        """The output folder with the options that open it (every path below comes from it)."""
        return OutputStore(self.out, self.storage_options)

    @property
    def run_url(self) -> str:
        return self.store.run_dir(self.model_version)

    @property
    def maps_url(self) -> str:
        return self.store.maps(self.model_version)

    def part_url(self, shard_index: int) -> str:
        return self.store.part(self.model_version, shard_index)

    def record_url(self, shard_index: int) -> str:
        return self.store.record(self.model_version, shard_index)

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
