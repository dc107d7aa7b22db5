"""A tiny CAM-shaped network for tests, the demo and the benchmark's smoke runs.

Stride 32 like DenseNet-121, so a 224 input gives the same 7x7 grid; its receptive field is one
32x32 cell, so evidence stays in the cell where it is (useful for planted-signal tests).
"""

from __future__ import annotations

from torch import nn


class TinyCAMNet(nn.Module):
    def __init__(self, num_classes: int = 14, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=4, stride=4),  # 224 -> 56
            nn.ReLU(),
            nn.Conv2d(width, width, kernel_size=2, stride=2),  # 28
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, kernel_size=2, stride=2),  # 14
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, kernel_size=2, stride=2),  # 7
            nn.BatchNorm2d(2 * width),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        f = nn.functional.relu(self.features(x))
        return self.classifier(f.mean((2, 3)))


def tiny_cam_net(num_classes: int = 14) -> TinyCAMNet:
    return TinyCAMNet(num_classes)
