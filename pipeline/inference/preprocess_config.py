"""Bounds on what reading one film may cost, and the settings that change its pixels.

No torch here: the run configuration (pipeline.config.run_config) takes its defaults from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args


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
