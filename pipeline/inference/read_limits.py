"""Bounds on what reading one film may cost, and the settings that change its pixels.

No torch here: the run configuration (pipeline.run.config) takes its defaults from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what one film may cost. Not part of a run's identity: they never change the pixels
    of a film that passes them. Real films are 0.3-0.5 MB (NIH), up to ~10 MB (16-bit PadChest)."""

    max_bytes: int = 64 * 2**20
    # 64 M pixels: far above any radiograph (PadChest ~ 4k x 4k) and below PIL's own 89 M warning.
    max_pixels: int = 64_000_000
    max_aspect: float = 6.0  # chest films are ~1:1.3; a 1 x 60,000 'film' would resize to 224 x 13 M
    # memory one decode may take (pixels x bytes per pixel of the decoded mode and the conversions it
    # needs, estimated from the header): a 16 MP 16-bit PadChest film needs ~112 MB, a 64 MP RGBA one 512 MB
    max_decode_bytes: int = 256 * 2**20
    timeout_s: float = 30.0  # per attempt, remote reads only (local reads of regular files do not hang)
    retries: int = 2  # further attempts after a transient error (timeout, connection, EIO)
    backoff_s: float = 0.5  # doubled after each attempt

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_pixels < 1 or self.max_decode_bytes < 1 or self.max_aspect < 1 or self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"invalid read limits {self}: sizes must be positive, aspect >= 1, retries >= 0")


HighBitDepth = Literal["clip", "rescale"]
HIGH_BIT_DEPTH_MODES: tuple[str, ...] = get_args(HighBitDepth)


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes the pixels the model sees (part of a run's identity)."""

    size: int = 224
    # 'clip' is what the reference does to a 16-bit PNG (PIL clips values above 255, so most of the
    # film turns white); 'rescale' maps the full 16-bit range to 8 bits first.
    high_bit_depth: HighBitDepth = "clip"
    # the entry of pipeline.inference.images.PREPROCESSING, set by the model (ModelSpec.preprocess):
    # 'chexnet' (RGB, Resize/CenterCrop, ImageNet normalisation) or 'xrv' (torchxrayvision's)
    method: str = "chexnet"

    def identity(self) -> dict:
        """What run identities and cache keys hold: the fields, without ``method`` when it is the
        default (outputs and caches written before it existed keep their identity)."""
        d = {"size": self.size, "high_bit_depth": self.high_bit_depth}
        return d if self.method == "chexnet" else {**d, "method": self.method}

    def __post_init__(self):
        if self.high_bit_depth not in HIGH_BIT_DEPTH_MODES:
            raise ValueError(f"high_bit_depth must be one of {HIGH_BIT_DEPTH_MODES}, got {self.high_bit_depth!r}")
