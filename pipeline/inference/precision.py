"""Numerical precision of the forward pass: an explicit, recorded choice.

``fp32`` (default) is strict IEEE float32 everywhere: on CUDA it turns TF32 off for convolutions and
matmuls (torch's CUDA default runs convolutions in TF32, ~1e-3 off the reference), so the 1e-4
parity contract holds on every device. ``tf32`` lets CUDA tensor cores use TF32 (on a CPU it computes
as fp32). ``bf16`` runs the network's ``features`` under bfloat16 autocast; the CAM head (pooling,
classifier, maps) always runs in float32 on the features cast back to float32.

A run's precision is part of its identity: ``run_version`` gives the run folder key.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Literal, get_args

from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: validating --precision must not pay for importing it.

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEFAULT_PRECISION: Precision = "fp32"

# Tolerances the tests hold each mode to, max |difference| against the float64 reference (DenseNet-121,
# random weights, real films); the README quotes the measured values.
PARITY_TOLERANCE = {"fp32": 1e-4, "tf32": 1e-4, "bf16": 5e-2}  # tf32: on CPU only; CUDA TF32 is ~3e-4/4e-3

_FLAGS_LOCK = threading.Lock()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def run_version(weights_version: str, precision: str) -> str:
    """The run's key (its folder under runs/ and its model_version column): the weights fingerprint,
    suffixed with the precision when it is not the default, so two precisions never share a run."""
    check_precision(precision)
    return weights_version if precision == DEFAULT_PRECISION else f"{weights_version}-{precision}"


def _set_cuda_tf32(on: bool) -> tuple:
    """Set TF32 for cuDNN convolutions and cuBLAS matmuls; return what was there."""
    import torch

    b = torch.backends
    if hasattr(b.cudnn, "conv") and hasattr(b.cuda.matmul, "fp32_precision"):  # torch >= 2.9 API
        old = (b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision)
        b.cudnn.conv.fp32_precision = b.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
        return ("new", old)
    old = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = on
    return ("legacy", old)


def _restore_cuda_tf32(saved: tuple) -> None:
    import torch

    api, old = saved
    b = torch.backends
    if api == "new":
        b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision = old
    else:
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def precision_mode(precision: str, device: "torch.device"):
    """TF32 flags for the duration of one forward (they are process-global, so set and restored
    under a lock: two shard tasks of one worker never see each other's setting)."""
    check_precision(precision)
    if device.type != "cuda":
        yield
        return
    with _FLAGS_LOCK:
        saved = _set_cuda_tf32(precision != "fp32")
        try:
            yield
        finally:
            _restore_cuda_tf32(saved)


def features_autocast(precision: str, device: "torch.device"):
    """bfloat16 autocast for the feature extractor in bf16 mode, else nothing."""
    if precision == "bf16":
        import torch

        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
