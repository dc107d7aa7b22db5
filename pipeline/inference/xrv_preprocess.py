"""torchxrayvision's preprocessing, as its datasets do it (``xrv.datasets.NIH_Dataset`` and the
README's recipe): ``normalize(img, 255, reshape=True)`` (the first channel of a colour film, scaled
from [0, 255] to [-1024, 1024]), ``XRayCenterCrop`` (the centred square of the short side),
``XRayResizer(size)`` (``skimage.transform.resize`` to (1, size, size), ``mode='constant'``,
``preserve_range=True``, float32). The same calls, without importing torchxrayvision (or torch) in
the decode processes; tests/inference/test_xrv.py checks them against the package on real films.

A 16-bit film is first brought to 8 bits as ``--high-bit-depth`` says (``rescale``: divided by 257,
before this function; ``clip``: values above 255 clipped, as PIL does for CheXNet's preprocessing),
so the scale is always torchxrayvision's ``maxval=255``.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from pipeline.inference.images import Preprocessing, PreprocessConfig


def xrv_pixels(img: Image.Image, config: PreprocessConfig, gray_plane: bool = True) -> np.ndarray:
    """One film -> float32 (size, size) in [-1024, 1024], torchxrayvision's model input (one channel)."""
    import skimage.transform

    del gray_plane  # always one plane
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255)
    if a.ndim > 2:  # normalize(reshape=True) keeps the first channel of a colour film
        a = a[:, :, 0]
    x = ((2 * (a.astype(np.float32) / 255) - 1.0) * 1024)[None]
    _, h, w = x.shape  # XRayCenterCrop
    crop = min(h, w)
    top, left = h // 2 - crop // 2, w // 2 - crop // 2
    x = x[:, top:top + crop, left:left + crop]
    with warnings.catch_warnings():  # XRayResizer
        warnings.simplefilter("ignore")
        x = skimage.transform.resize(x, (1, config.size, config.size), mode="constant", preserve_range=True).astype(np.float32)
    return np.ascontiguousarray(x[0])


def xrv_tensor(pixels, device):
    """float32 (size, size) films -> float32 (B, 1, size, size) on ``device``."""
    import torch

    x = torch.from_numpy(np.stack([np.asarray(px, dtype=np.float32) for px in pixels])[:, None])
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


XRV = Preprocessing(xrv_pixels, xrv_tensor, channels=1, cacheable=False)
