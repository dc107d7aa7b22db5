"""Networks for tests: a slow one (so a job can be killed mid-way) and a planted-evidence one."""

import os
import time

import torch
from torch import nn

from pipeline.inference.tiny_net import TinyCAMNet


SLOW_ENV = {"CXR_TEST_SLOW_NET": "0.25"}  # seconds per batch: give it to the job a test kills mid-run


class _Slow(nn.Sequential):
    """Sleeps per batch only where SLOW_ENV is set (the process a test interrupts): the same net's
    in-process reference runs and reruns go at full speed and give the same numbers."""

    def forward(self, x):
        time.sleep(float(os.environ.get("CXR_TEST_SLOW_NET", "0")))
        return super().forward(x)


def slow_tiny_net(num_classes: int = 14) -> TinyCAMNet:
    net = TinyCAMNet(num_classes)
    net.features = _Slow(*net.features)  # same parameter names as TinyCAMNet
    return net


class _ChannelMean(nn.Module):
    def forward(self, x):
        return x.mean(1, keepdim=True)


class PlantedNet(nn.Module):
    """CAM-shaped, receptive field of exactly one 32x32 cell: the feature of a cell is its mean
    normalised brightness, so only a bright cell has relu(feature) > 0. Every finding's cell logit
    is z = 4 * feature - 6 (dark cells: ln(sigmoid(-6)/p) < 0 for every reference baseline)."""

    def __init__(self, num_classes: int = 14):
        super().__init__()
        self.features = nn.Sequential(_ChannelMean(), nn.AvgPool2d(32))
        self.classifier = nn.Linear(1, num_classes)
        with torch.no_grad():
            self.classifier.weight.fill_(4.0)
            self.classifier.bias.fill_(-6.0)


def planted_net(num_classes: int = 14) -> PlantedNet:
    return PlantedNet(num_classes)


class MarkerNet(nn.Module):
    """Two features per 32x32 cell: its mean brightness, and a 'marker detector' that fires only on
    near-white cells (brightness above 1.5 in normalised units). Receptive field: one cell."""

    def __init__(self, num_classes: int = 14):
        super().__init__()
        detector = nn.Conv2d(1, 2, kernel_size=1)
        with torch.no_grad():
            detector.weight.fill_(1.0)
            detector.bias.copy_(torch.tensor([0.0, -1.5]))
        self.features = nn.Sequential(_ChannelMean(), nn.AvgPool2d(32), detector)
        self.classifier = nn.Linear(2, num_classes)


def marker_net(num_classes: int = 14) -> MarkerNet:
    return MarkerNet(num_classes)
