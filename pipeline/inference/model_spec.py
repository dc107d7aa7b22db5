"""What identifies a model to load, without importing torch: a shard task's spec unpickles on a
worker before torch is loaded there, so the shard's films start decoding while it loads (issue 8)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.core.errors import ConfigError
from pipeline.core.findings import CHEXNET_FINDINGS
from pipeline.inference.architectures import DEFAULT_ARCH, arch_profile
from pipeline.inference.xrv_profiles import job_finding


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model to load: picklable and hashable, so it travels in task specs.

    ``outputs``: for each finding, the index of the network output that scores it (empty: output k
    is finding k). ``op_threshs``: per finding, the operating point of torchxrayvision's calibration
    (None: none; empty: an uncalibrated model). ``preprocess``/``input_size``: how films become its input
    (``pipeline.inference.images.PREPROCESSING``). Build it with ``model_spec_for`` from ``--arch``."""

    arch: str = DEFAULT_ARCH
    checkpoint: str = "random:0"  # a path/URL, or 'random:SEED' for seeded random weights
    findings: tuple[str, ...] = CHEXNET_FINDINGS
    storage_options: tuple[tuple[str, str], ...] = field(default=())
    outputs: tuple[int, ...] = ()
    op_threshs: tuple[float | None, ...] = ()  # None, not NaN: NaN != NaN would make equal specs unequal
    preprocess: str = "chexnet"
    input_size: int = 224

    @property
    def calibrated(self) -> bool:
        return any(t is not None for t in self.op_threshs)

    def describe(self) -> dict:
        """What run.json states about the model beyond its weights: its output names, which of them
        became which finding, the calibration and the preprocessing."""
        profile = arch_profile(self.arch)
        targets = profile.targets or self.findings
        kept = self.outputs or tuple(range(len(self.findings)))
        return {
            "arch": self.arch,
            "preprocess": self.preprocess,
            "input_size": self.input_size,
            "model_outputs": list(targets),
            "finding_outputs": {f: {"output": i, "model_name": targets[i]} for f, i in zip(self.findings, kept)},
            "dropped_outputs": [t or f"(unused output {i})" for i, t in enumerate(targets) if i not in kept],
            "op_threshs": dict(zip(self.findings, self.op_threshs)) if self.op_threshs else None,
            "map": MAP_DEFINITION_CALIBRATED if self.calibrated else MAP_DEFINITION,
        }


MAP_DEFINITION = "ln(sigmoid(z_ij) / p_baseline): z_ij the cell's logit, whose mean over the grid is the image's logit"
MAP_DEFINITION_CALIBRATED = (
    "ln(sigmoid(z_ij) / p_baseline) on the uncalibrated cell probability sigmoid(z_ij); the probabilities in "
    "predictions are torchxrayvision's calibrated ones, op_norm(sigmoid(z)) (p / (2 t) below the operating point t, "
    "1 - (1 - p) / (2 (1 - t)) above it), an increasing function of sigmoid(z): the calibrated probability of a cell "
    "is op_norm(p_baseline * exp(map))")


def model_spec_for(arch: str, checkpoint: str, findings: tuple[str, ...],
                   storage_options: tuple[tuple[str, str], ...] = ()) -> ModelSpec:
    """The spec of ``--arch`` with the run's ``--findings``. A network with its own output names
    (torchxrayvision's) scores each finding it has an output for, by the job's name for it
    (``xrv_profiles.FINDING_SYNONYMS``), in ``findings``' order; its unused ('') outputs and the ones no
    finding asks for are dropped (run.json lists them), and so are findings it has no output for."""
    profile = arch_profile(arch)
    common = dict(storage_options=storage_options, preprocess=profile.preprocess, input_size=profile.input_size)
    if not profile.targets:
        return ModelSpec(arch, checkpoint, tuple(findings), **common)
    index = {}
    for i, t in enumerate(profile.targets):
        if t:
            index.setdefault(job_finding(t), i)
    kept = tuple(f for f in findings if f in index)
    if not kept:
        raise ConfigError(f"--arch {arch} has no output for any of --findings {', '.join(findings)}; its outputs are "
                          f"{', '.join(t for t in profile.targets if t)}: pass some of them with --findings")
    outputs = tuple(index[f] for f in kept)
    threshs = tuple(None if math.isnan(profile.op_threshs[i]) else profile.op_threshs[i] for i in outputs) if profile.op_threshs else ()
    return ModelSpec(arch, checkpoint, kept, outputs=outputs, op_threshs=threshs, **common)
