"""One forward pass per batch gives, for every finding at once: probability, 7x7 ln-ratio map,
exact cell logits, and the pooled embedding.

For a CAM-shaped model the image logit equals the mean of the cell logits
``z_ij = W_k . relu(F)[:, i, j] + b_k``, so ``(z_ij - b_k) / (H*W)`` is each cell's exact additive
contribution; the seed's map is ``ln(sigmoid(z_ij) / p_baseline_k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.inference.images import PREPROCESSING
from pipeline.inference.model import CamModel
from pipeline.inference.precision import DEFAULT_PRECISION, features_autocast, precision_mode


# What maps.zarr's cell_features holds (issue 14): each grid cell's full relu(features) vector,
# float16. Random projections to 32-256 values and PCA to 32-512 lost 0.02-0.2 of AUC per cell on
# the shared real films (README, "Hospital identifiability"); float16 rounding loses < 0.003.


@dataclass
class BatchOutputs:
    prob: np.ndarray  # float32 (B, F)
    cam: np.ndarray  # float32 (B, F, H, W): ln(sigmoid(z) / baseline)
    cell_logit: np.ndarray  # float32 (B, F, H, W): z
    embedding: np.ndarray  # float16 (B, D)
    cell_features: np.ndarray  # float16 (B, H*W, D): each cell's relu(features) vector


def cam_from_features(fmap: torch.Tensor, linear: torch.nn.Linear, log_baseline: torch.Tensor):
    """fmap: relu(features) (B, D, H, W). Returns float32 torch tensors (prob, cam, cell_logit, pooled).

    The head runs in float64 and is rounded once to float32: a float32 GEMM's rounding depends on
    the batch's size, so a film rescored in another batch (a grown dataset's last shard, a retried
    film) would differ in the last bit; in float64 the rounding to float32 is the same every time.
    It is ~2e7 multiply-adds per batch of 32, negligible next to the feature extractor."""
    f64 = fmap.double()
    w, b = linear.weight.double(), linear.bias.double()
    pooled = f64.mean((2, 3))  # as torchvision's adaptive_avg_pool2d, in float64
    prob = torch.sigmoid(pooled @ w.T + b)
    cell_logit = torch.einsum("bdhw,fd->bfhw", f64, w) + b.view(1, -1, 1, 1)
    # logsigmoid rather than log(sigmoid(.)): same value, no -inf for very negative logits.
    cam = F.logsigmoid(cell_logit) - log_baseline.double().view(1, -1, 1, 1)
    return prob.float(), cam.float(), cell_logit.float(), pooled.float()


def op_norm(prob: torch.Tensor, op_threshs: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's calibration (``xrv.models.op_norm``) of probabilities (B, F): below the
    operating point t, p / (2 t); above it, 1 - (1 - p) / (2 (1 - t)); t maps to 0.5. An increasing,
    piecewise-linear function of p. Where t is NaN (no operating point) p is left as it is
    (torchxrayvision returns a constant 0.5 there, which carries nothing to audit)."""
    t = op_threshs.to(prob.dtype).view(1, -1).expand_as(prob)
    cal = torch.where(prob < t, prob / (t * 2), 1.0 - (1.0 - prob) / ((1 - t) * 2))
    return torch.where(torch.isnan(t), prob, cal)


def _op_threshs(model: CamModel, device) -> torch.Tensor | None:
    spec = model.spec
    if not spec.calibrated:
        return None
    return torch.tensor([math.nan if t is None else t for t in spec.op_threshs], dtype=torch.float64, device=device)


@torch.inference_mode()
def infer_batch(model: CamModel, pixels: np.ndarray | torch.Tensor | list[np.ndarray], baselines: tuple[float, ...], *,
                precision: str = DEFAULT_PRECISION) -> BatchOutputs:
    """A batch of films as the model's preprocessing decoded them (CheXNet's: uint8 (B, H, W, 3)
    pixels, or (B, H, W) grayscale planes, or a list mixing both; torchxrayvision's: float32 planes)
    -> every output, on the model's device, one forward pass.
    ``precision`` (pipeline.inference.precision): fp32 (strict, TF32 off on CUDA), tf32 or bf16 features.

    A calibrated model (torchxrayvision's ``op_threshs``): ``prob`` is the calibrated probability
    ``op_norm(sigmoid(z))``, as torchxrayvision's own forward returns it; the map stays
    ``ln(sigmoid(z_ij) / p_baseline)`` on the uncalibrated cell probability. op_norm is increasing, so
    the map orders cells as the calibrated cell probability ``op_norm(p_baseline * exp(map))`` does."""
    device = model.classifier.weight.device
    x = PREPROCESSING[model.spec.preprocess].tensor(pixels, device)
    x = x.contiguous(memory_format=torch.channels_last)
    with precision_mode(precision, device):
        with features_autocast(precision, device):
            fmap = F.relu(model.features(x))
        fmap = fmap.float()  # the CAM head always runs in float32
        log_b = torch.log(torch.tensor(baselines, dtype=fmap.dtype, device=device))
        prob, cam, cell_logit, pooled = cam_from_features(fmap, model.classifier, log_b)
        threshs = _op_threshs(model, device)
        if threshs is not None:
            prob = op_norm(prob.double(), threshs).float()
        proj = fmap.permute(0, 2, 3, 1).flatten(1, 2)  # (B, H*W, D)
    return BatchOutputs(
        prob=prob.float().cpu().numpy(),
        cam=cam.float().cpu().numpy(),
        cell_logit=cell_logit.float().cpu().numpy(),
        embedding=pooled.cpu().numpy().astype(np.float16),
        cell_features=proj.half().cpu().numpy(),
    )
