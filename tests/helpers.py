"""Networks for tests that need a job to take a while (so it can be killed mid-way)."""

import time

from torch import nn

from pipeline.tiny_net import TinyCAMNet


class _Slow(nn.Sequential):
    def forward(self, x):
        time.sleep(0.25)
        return super().forward(x)


def slow_tiny_net(num_classes: int = 14) -> TinyCAMNet:
    net = TinyCAMNet(num_classes)
    net.features = _Slow(*net.features)  # same parameter names as TinyCAMNet
    return net
