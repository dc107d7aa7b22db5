"""Read, decode and preprocess one film exactly as the CheXNet reference does.

Reference: PIL ``convert('RGB')``, ``Resize(224)``, ``CenterCrop(224)``, ``ToTensor``, ImageNet
``Normalize``. Decoding and resizing stay on the CPU and yield uint8 HWC arrays (what travels to the
model and what a cache would keep); normalisation happens batched on the model's device.

Decoding imports neither torch nor torchvision: decode processes start from a forkserver that
preloads this module, and importing torch there cost about 2.5 s of CPU per run (issue 8).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from pipeline.core.errors import ImageError
from pipeline.core.registry import Registry
from pipeline.inference.preprocess_config import HIGH_BIT_DEPTH_MODES, PreprocessConfig  # noqa: F401 - torch-free home, re-exported here
from pipeline.io.reads import ReadLimits, image_error, read_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Radiograph formats only: PIL would otherwise also try EPS (which runs Ghostscript), PSD, ICO, ...
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # JPEG includes MPO (multi-picture) files
Image.init()  # registers every plugin, so that naming TIFF in formats= is valid


@dataclass(frozen=True)
class Decoded:
    # uint8 (size, size, 3); or (size, size) for a grayscale film decoded with gray_plane=True (its
    # three channels are equal): a third of the bytes cross from a decode process, and
    # normalize_batch takes the planes as they are. torchxrayvision's preprocessing: float32 (size, size)
    pixels: np.ndarray
    source_mode: str  # PIL mode of the file: 'L', 'RGB', 'RGBA', 'I;16', ...

    def rgb(self) -> np.ndarray:
        """The pixels as uint8 (size, size, 3), whichever form they came in."""
        return self.pixels if self.pixels.ndim == 3 else np.repeat(self.pixels[:, :, None], 3, axis=2)


class TooManyPixels(Exception):
    """The header declares more pixels than --max-image-pixels (a decompression bomb)."""


class ExtremeAspectRatio(Exception):
    """The header declares a film thinner than --max-aspect-ratio (resizing it would explode)."""


class TooMuchMemory(Exception):
    """Decoding the film would take more memory than ReadLimits.max_decode_bytes (from its header)."""


# bytes per pixel of PIL's decoded image, by mode (PIL keeps RGB, LA, ... as 4 bytes a pixel)
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decode_bytes_estimate(mode: str, w: int, h: int, config: PreprocessConfig) -> int:
    """Peak memory of decode_preprocess for a film, from its header: the decoded image plus the
    full-size conversion it needs (float32 for a rescaled 16-bit film, RGB for a colour one)."""
    decoded = _MODE_BYTES.get(mode, 4)
    if mode in _SIXTEEN_BIT and config.high_bit_depth == "rescale":
        work = 4 + 1  # float32 in place, then uint8
    elif mode in ("L", "1", "P"):
        work = 0 if mode == "L" else 4
    else:
        work = 4  # convert('RGB')
    return w * h * (decoded + work)


def _open(data: bytes, limits: ReadLimits = ReadLimits(), config: PreprocessConfig = PreprocessConfig()) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # beyond PIL's own limit, refused at open
        raise ImageError("decode", TooManyPixels(f"{e} (limit --max-image-pixels {limits.max_pixels})")) from None
    except Exception as e:  # noqa: BLE001
        raise ImageError("decode", e) from e
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageError("decode", TooManyPixels(f"{w} x {h} = {w * h} pixels, more than --max-image-pixels {limits.max_pixels}"))
    if min(w, h) < 1 or max(w, h) / min(w, h) > limits.max_aspect:
        raise ImageError("decode", ExtremeAspectRatio(f"{w} x {h} is thinner than --max-aspect-ratio {limits.max_aspect:g}"))
    need = decode_bytes_estimate(img.mode, w, h, config)
    if need > limits.max_decode_bytes:  # bounded per decode process, not only by the pixel count
        raise ImageError("decode", TooMuchMemory(f"{w} x {h} pixels in mode {img.mode} need about {need // 2**20} MiB to decode, "
                                                 f"more than the {limits.max_decode_bytes // 2**20} MiB a decode may take"))
    try:
        img.load()  # PIL opens lazily; truncation only shows here
    except Exception as e:  # noqa: BLE001 - a decoder may raise anything on hostile bytes
        raise ImageError("decode", e) from e
    return img


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize(size) + CenterCrop(size) as torchvision does them on PIL images, step for step (the
    same output size, the same PIL call, the same rounding of the crop box), so byte-identical
    (tests/inference/test_images.py compares them) without importing torchvision."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)  # torchvision's _compute_resized_output_size
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    # the long side is never shorter than `size`, so torchvision's padding branch cannot apply
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def decode_preprocess(data: bytes, config: PreprocessConfig = PreprocessConfig(), limits: ReadLimits = ReadLimits(),
                      gray_plane: bool = False) -> Decoded:
    """Bytes of a PNG/JPEG to the uint8 (size, size, 3) array that ToTensor would see (gray_plane:
    a grayscale film as its one (size, size) plane, which that array repeats three times)."""
    img = _open(data, limits, config)
    mode = img.mode
    try:
        if mode in _SIXTEEN_BIT and config.high_bit_depth == "rescale":
            # in place, in float32 (4 bytes a pixel, not 3 float64 temporaries): the same values, since
            # x / 257 is never within float32's error of a half (257 is odd, so never exactly one)
            a = np.array(img, dtype=np.float32)
            a /= 257.0
            np.rint(a, out=a)
            np.clip(a, 0, 255, out=a)
            img = Image.fromarray(a.astype(np.uint8), mode="L")
        pixels = PREPROCESSING[config.method].pixels(img, config, gray_plane)
    except Exception as e:  # noqa: BLE001 - one film's failure, whatever PIL/torchvision raise
        raise ImageError("preprocess", e) from e
    return Decoded(pixels, mode)


def chexnet_pixels(img: Image.Image, config: PreprocessConfig, gray_plane: bool) -> np.ndarray:
    """CheXNet's film: uint8 (size, size, 3) after Resize + CenterCrop (or its one grey plane)."""
    if img.mode == "L":
        # Grayscale: resampling is per band with identical weights, so resizing one band and
        # repeating it equals convert('RGB') then resize, at a third of the cost.
        small = np.asarray(_resize_crop(img, config.size))
        pixels = small if gray_plane else np.repeat(small[:, :, None], 3, axis=2)
    else:
        # RGBA: convert('RGB') drops alpha without compositing, as the reference does.
        pixels = np.array(_resize_crop(img.convert("RGB"), config.size))
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def chexnet_tensor(pixels, device: "torch.device") -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
    """A batch as decoded (uint8 (B, H, W, 3), (B, H, W) planes, or a list mixing both) -> float32
    (B, 3, H, W) on ``device``: ToTensor then ImageNet Normalize."""
    import torch

    if isinstance(pixels, (list, tuple)):  # films as decoded: planes and RGB arrays, possibly mixed
        if device.type == "cpu":
            return normalize_films(list(pixels))
        rgb = [px if px.ndim == 3 else np.repeat(px[:, :, None], 3, axis=2) for px in pixels]
        return normalize_batch(torch.as_tensor(np.stack(rgb)).pin_memory().to(device, non_blocking=True))  # normalised on the device
    x = torch.as_tensor(pixels)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return normalize_batch(x.to(device))


@dataclass(frozen=True)
class Preprocessing:
    """How films become a model's input: ``pixels(img, config, gray_plane)`` in the decode processes
    (no torch there), ``tensor(films, device)`` where the model runs. ``channels``: its input's.
    ``cacheable``: whether its films are the uint8 arrays the preprocessed-image cache keeps."""

    pixels: Callable[[Image.Image, PreprocessConfig, bool], np.ndarray]
    tensor: Callable[..., "torch.Tensor"]  # noqa: F821 - torch is imported lazily
    channels: int = 3
    cacheable: bool = True


# Keyed by ModelSpec.preprocess / PreprocessConfig.method (the model's profile chooses it).
PREPROCESSING = Registry("preprocessing", "--arch")
PREPROCESSING.register("chexnet", Preprocessing(chexnet_pixels, chexnet_tensor),
                       help="CheXNet's: RGB, Resize + CenterCrop, ImageNet normalisation")
PREPROCESSING.register("xrv", "pipeline.inference.xrv_preprocess:XRV",
                       help="torchxrayvision's: one grey channel in [-1024, 1024], XRayCenterCrop, XRayResizer")


def load_image(path: str, config: PreprocessConfig = PreprocessConfig(), storage_options: dict | None = None,
               limits: ReadLimits = ReadLimits()) -> Decoded:
    """One film, read, decoded and preprocessed. Raises ImageError only (stage read|decode|preprocess):
    whatever goes wrong with one film is that film's error, never its shard's."""
    return decode_bytes(read_bytes(path, storage_options, limits), config, limits)


def decode_bytes(data: bytes, config: PreprocessConfig = PreprocessConfig(), limits: ReadLimits = ReadLimits(),
                 gray_plane: bool = False) -> Decoded:
    """decode_preprocess that raises ImageError only (the cache reads the bytes itself to hash them)."""
    try:
        return decode_preprocess(data, config, limits, gray_plane)
    except ImageError:
        raise
    except MemoryError as e:  # a film that passed the limits but still does not fit
        raise ImageError("decode", e) from None
    except Exception as e:  # noqa: BLE001 - the agreed interface: nothing else escapes
        raise image_error("preprocess", e) from e


def normalize_ops(pixels: "torch.Tensor") -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
    """The definition: uint8 (N, H, W, 3) -> float32 (N, 3, H, W), ToTensor then Normalize, the
    reference's op order (the result keeps the input's channels-last memory layout)."""
    import torch

    x = pixels.permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


_LUT: list = []  # (3, 256) float32: normalize_ops of every uint8 value, per channel


def _lut() -> np.ndarray:
    if not _LUT:
        import torch

        values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, 3).contiguous()
        _LUT.append(np.ascontiguousarray(normalize_ops(values)[0, :, 0, :].numpy()))
    return _LUT[0]


def normalize_batch(pixels: "torch.Tensor") -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
    """uint8 (N, H, W, 3), or grayscale planes (N, H, W) -> float32 (N, 3, H, W) in channels-last
    memory, ToTensor then Normalize (a plane as the three equal channels it stands for).

    On the CPU every output element is a function of one uint8 value and its channel, so a table of
    normalize_ops over the 256 values gives bit-identical results in one gather instead of four
    passes (half the CPU time, which the decode processes share on a CPU worker); a plane needs one
    gather of the table's rows (a quarter of the three channels' time)."""
    import torch

    if pixels.dim() == 3:  # grayscale planes
        if pixels.device.type == "cpu" and pixels.dtype == torch.uint8:
            rows = np.ascontiguousarray(_lut().T)  # (256, 3): a value's three normalised channels
            return torch.from_numpy(np.take(rows, pixels.numpy(), axis=0)).permute(0, 3, 1, 2)
        pixels = pixels.unsqueeze(-1).expand(*pixels.shape, 3)
    if pixels.device.type != "cpu" or pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
        return normalize_ops(pixels)
    lut, px = _lut(), pixels.numpy()
    out = np.empty(px.shape, np.float32)
    for c in range(3):
        out[..., c] = lut[c][px[..., c]]
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def normalize_films(films: "list[np.ndarray]") -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
    """A batch of films as they come from decoding, uint8 (H, W, 3) arrays and grayscale (H, W)
    planes mixed, -> float32 (N, 3, H, W) in channels-last memory: normalize_batch of their stacked
    RGB arrays, bit for bit, without first repeating each plane into three channels (a batch with one
    colour film among grayscale ones cost 21 ms per 32 films that way, 5 ms this way)."""
    import torch

    lut = _lut()
    rows = np.ascontiguousarray(lut.T)  # (256, 3)
    channels = np.arange(3)
    out = np.empty((len(films),) + films[0].shape[:2] + (3,), np.float32)
    for i, px in enumerate(films):
        if px.dtype != np.uint8 or px.shape[:2] != out.shape[1:3] or px.ndim not in (2, 3) or (px.ndim == 3 and px.shape[2] != 3):
            raise ValueError(f"film {i}: expected uint8 (H, W) or (H, W, 3) of the batch's size, got {px.dtype} {px.shape}")
        if px.ndim == 2:
            np.take(rows, px, axis=0, out=out[i])
        else:
            out[i] = lut[channels, px]  # lut[c, px[..., c]] for each channel c, in one pass
    return torch.from_numpy(out).permute(0, 3, 1, 2)


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
