"""What identifies a model to load, without importing torch: a shard task's spec unpickles on a
worker before torch is loaded there, so the shard's films start decoding while it loads (issue 8)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.findings import CHEXNET_FINDINGS
from pipeline.inference.architectures import DEFAULT_ARCH


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model to load: picklable and hashable, so it travels in task specs."""

    arch: str = DEFAULT_ARCH
    checkpoint: str = "random:0"  # a path/URL, or 'random:SEED' for seeded random weights
    findings: tuple[str, ...] = CHEXNET_FINDINGS
    storage_options: tuple[tuple[str, str], ...] = field(default=())
