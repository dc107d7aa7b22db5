"""Read, decode and preprocess one film exactly as the CheXNet reference does.

Reference: PIL ``convert('RGB')``, ``Resize(224)``, ``CenterCrop(224)``, ``ToTensor``, ImageNet
``Normalize``. Decoding and resizing stay on the CPU and yield uint8 HWC arrays (what travels to the
model and what a cache would keep); normalisation happens batched on the model's device.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from .errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HIGH_BIT_DEPTH_MODES = ("clip", "rescale")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes the pixels the model sees (part of a run's identity)."""

    size: int = 224
    # 'clip' is what the reference does to a 16-bit PNG (PIL clips values above 255, so most of the
    # film turns white); 'rescale' maps the full 16-bit range to 8 bits first.
    high_bit_depth: str = "clip"

    def __post_init__(self):
        if self.high_bit_depth not in HIGH_BIT_DEPTH_MODES:
            raise ValueError(f"high_bit_depth must be one of {HIGH_BIT_DEPTH_MODES}, got {self.high_bit_depth!r}")


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8, (size, size, 3)
    source_mode: str  # PIL mode of the file: 'L', 'RGB', 'RGBA', 'I;16', ...


def read_bytes(path: str, storage_options: dict | None = None) -> bytes:
    """Whole file as bytes from any fsspec URL. Raises ImageError(stage='read')."""
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except Exception as e:  # noqa: BLE001 - any backend failure is one image's failure
        raise ImageError("read", e) from e
    if not data:
        raise ImageError("read", EOFError(f"{path} is empty (0 bytes)"))
    return data


def _open(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # PIL opens lazily; truncation only shows here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError("decode", e) from e
    return img


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    # torchvision's own functions on PIL images: byte-identical to Resize(size) + CenterCrop(size).
    return TF.center_crop(TF.resize(img, size), [size, size])


def decode_preprocess(data: bytes, config: PreprocessConfig = PreprocessConfig()) -> Decoded:
    """Bytes of a PNG/JPEG to the uint8 (size, size, 3) array that ToTensor would see."""
    img = _open(data)
    mode = img.mode
    try:
        if mode in _SIXTEEN_BIT and config.high_bit_depth == "rescale":
            a = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")
        if img.mode == "L":
            # Grayscale: resampling is per band with identical weights, so resizing one band and
            # repeating it equals convert('RGB') then resize, at a third of the cost.
            small = np.asarray(_resize_crop(img, config.size))
            pixels = np.repeat(small[:, :, None], 3, axis=2)
        else:
            # RGBA: convert('RGB') drops alpha without compositing, as the reference does.
            pixels = np.array(_resize_crop(img.convert("RGB"), config.size))
    except (OSError, ValueError) as e:
        raise ImageError("preprocess", e) from e
    return Decoded(np.ascontiguousarray(pixels, dtype=np.uint8), mode)


def load_image(path: str, config: PreprocessConfig = PreprocessConfig(), storage_options: dict | None = None) -> Decoded:
    return decode_preprocess(read_bytes(path, storage_options), config)


def normalize_batch(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), ToTensor then Normalize, same op order."""
    x = pixels.permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def reference_transform(size: int = 224):
    """The reference pipeline, verbatim, for parity tests and the benchmark's baseline (c)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
        ]
    )
