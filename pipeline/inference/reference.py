"""The straightforward per-image reference (Zech et al.'s way): one image at a time, the model's own
forward for the probability, and the map by explicit loops over cells, once per finding.

Used by the parity tests and as baseline (c) of the benchmark; never by the job.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.inference.images import reference_transform


@torch.no_grad()
def reference_image(net: torch.nn.Module, linear: torch.nn.Linear, path: str, baselines, size: int = 224,
                    features_per_finding: bool = True):
    """Returns (probabilities list[F], maps list[F][H][W]) for one film. ``features_per_finding``
    False computes the features once (the same numbers: the parity tests use it to save 13 forwards)."""
    x = reference_transform(size)(Image.open(path).convert("RGB")).unsqueeze(0)
    prob = torch.sigmoid(net(x))[0].tolist()
    maps = []
    once = None if features_per_finding else F.relu(net.features(x))[0]
    for k, p_base in enumerate(baselines):
        fmap = F.relu(net.features(x))[0] if once is None else once  # the notebook recomputed them per finding
        h, w = fmap.shape[1:]
        grid = [[0.0] * w for _ in range(h)]
        for i in range(h):
            for j in range(w):
                z = float(linear.weight[k] @ fmap[:, i, j] + linear.bias[k])
                grid[i][j] = math.log((1.0 / (1.0 + math.exp(-z))) / p_base)
        maps.append(grid)
    return prob, maps
