"""torchxrayvision's networks, untrained, in the CAM shape the job needs (``features`` and a Linear
``classifier``). Weights come from ``--checkpoint`` (a released file converted with
``jobs.convert_checkpoint --trust-pickle``) or ``random:SEED``.

Both builders make every output the model has (18, unused ones included); the job keeps the outputs
that its findings map onto (``ModelSpec.outputs``)."""

from __future__ import annotations

import warnings

import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from pipeline.inference.xrv_profiles import XRV_MODELS


def import_xrv():
    """torchxrayvision, imported without its process-wide ``warnings.filterwarnings("ignore")``
    (its models module sets it on import; here it is undone when the import returns)."""
    with warnings.catch_warnings():
        import torchxrayvision

    return torchxrayvision


def densenet121(num_classes: int | None = None) -> nn.Module:
    """``xrv.models.DenseNet(weights=None)``: DenseNet-121 on one grey channel, 18 outputs. Its
    ``features`` then ``relu``, mean pool and ``classifier`` is exactly its forward (which adds
    calibration only when built with op_threshs; the job applies it itself, from the spec)."""
    del num_classes  # the network has its own outputs (xrv_profiles)
    return import_xrv().models.DenseNet(weights=None)


class XrvResNet50(torchvision.models.ResNet):
    """``xrv.models.ResNet(weights="resnet50-res512-all")``'s network: torchvision's ResNet-50 with a
    one-channel ``conv1`` and 18 outputs, built as torchxrayvision builds it (same state-dict keys, so
    its released file loads as it is). torchxrayvision's class cannot be built without downloading
    weights. ``features`` (conv1 ... layer4; layer4 ends in a ReLU) and ``classifier`` (``fc``) are
    views of its own modules, not modules of their own: the state dict stays torchvision's."""

    def __init__(self, num_classes: int = 18):
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
        self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)

    @property
    def features(self) -> nn.Sequential:
        return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3, self.layer4)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc


def resnet50(num_classes: int | None = None) -> nn.Module:
    del num_classes
    return XrvResNet50(len(XRV_MODELS["resnet50-res512-all"][0]))
