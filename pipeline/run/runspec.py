"""What every shard task needs to know about its run. Small, frozen, picklable.

Derived once from the resolved configuration (``RunSpec.derive``); never patched afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.inference.images import PreprocessConfig, ReadLimits
from pipeline.inference.model import ModelSpec
from pipeline.inference.precision import DEFAULT_PRECISION
from pipeline.run.config import ComputeConfig, Resolved
from pipeline.store.storage import join

_C = ComputeConfig()  # the defaults below are the configuration's, not copies of them


@dataclass(frozen=True)
class RunSpec:
    out: str
    model: ModelSpec
    model_version: str
    baselines: tuple[float, ...]
    preprocess: PreprocessConfig = PreprocessConfig()
    batch_size: int = _C.batch_size
    device: str = _C.device  # a policy: each worker resolves 'auto' (pipeline.inference.model.resolve_device)
    shard_size: int = _C.shard_size
    n_rows: int = 0
    grid: tuple[int, int] = (7, 7)
    embedding_dim: int = 1024
    decode_threads: int | None = _C.decode_threads  # None: one per core of the worker
    torch_threads: int | None = None  # None: the worker's cores / its task threads
    storage_options: tuple[tuple[str, str], ...] = field(default=())
    cache_url: str | None = None  # the cache group for this preprocessing config; None: no cache
    precision: str = DEFAULT_PRECISION  # pipeline.inference.precision: fp32 | tf32 | bf16 (part of the identity)
    decode_workers: int | None = _C.decode_workers  # decode processes per worker; None: one per core of the worker
    read_limits: ReadLimits = ReadLimits()  # bounds per film (not identity: they never change pixels)

    @classmethod
    def derive(cls, resolved: Resolved, *, model: ModelSpec, model_version: str, n_rows: int, grid: tuple[int, int],
               embedding_dim: int, cache_url: str | None) -> "RunSpec":
        """The shard spec of a resolved configuration and the facts of its model and manifest."""
        cfg = resolved.config
        return cls(
            out=cfg.output.out.rstrip("/"),
            model=model,
            model_version=model_version,
            baselines=resolved.baselines,
            preprocess=cfg.images.preprocess(),
            batch_size=cfg.compute.batch_size,
            device=resolved.device,
            shard_size=cfg.compute.shard_size,
            n_rows=n_rows,
            grid=grid,
            embedding_dim=embedding_dim,
            decode_threads=cfg.compute.decode_threads,
            decode_workers=cfg.compute.decode_workers,
            precision=cfg.model.precision,
            storage_options=tuple(sorted(cfg.output.storage_options.items())),
            cache_url=cache_url,
            read_limits=cfg.images.read_limits(),
        )

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
