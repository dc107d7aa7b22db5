"""What every shard task needs to know about its run. Small, frozen, picklable.

Derived once from the resolved configuration (``RunSpec.derive``); never patched afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from pipeline.inference.preprocess_config import PreprocessConfig
from pipeline.io.location import InputOptions
from pipeline.io.reads import ReadLimits
from pipeline.inference.model_spec import ModelSpec
from pipeline.inference.precision import DEFAULT_PRECISION
from pipeline.config.run_config import ComputeConfig, Resolved
from pipeline.store.layout import OutputStore
from pipeline.io.location import freeze_options

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
    torch_threads: int | None = None  # None: the worker's cores / its task threads
    storage_options: tuple[tuple[str, str], ...] = field(default=())  # --out's only
    cache_url: str | None = None  # the cache group for this preprocessing config; None: no cache
    precision: str = DEFAULT_PRECISION  # pipeline.inference.precision: fp32 | tf32 | bf16 (part of the identity)
    decode_workers: int | None = _C.decode_workers  # decode processes per worker; None: one per core of the worker
    read_limits: ReadLimits = ReadLimits()  # bounds per film (not identity: they never change pixels)
    inputs: InputOptions = InputOptions()  # the options films are read with (never --out's); not identity

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
            preprocess=cfg.preprocess(),
            batch_size=cfg.compute.batch_size,
            device=resolved.device,
            shard_size=cfg.compute.shard_size,
            n_rows=n_rows,
            grid=grid,
            embedding_dim=embedding_dim,
            decode_workers=cfg.compute.decode_workers,
            precision=cfg.model.precision,
            storage_options=freeze_options(cfg.output.storage_options),
            inputs=cfg.inputs(),
            cache_url=cache_url,
            read_limits=cfg.images.read_limits(),
        )

    @cached_property
    def store(self) -> OutputStore:
        """The output folder with the options that open it (every path below comes from it; its
        filesystem resolved once per spec and process)."""
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
            "preprocess": self.preprocess.identity(),
            "shard_size": self.shard_size,
            "grid": list(self.grid),
            "embedding_dim": self.embedding_dim,
            "precision": self.precision,
        }
