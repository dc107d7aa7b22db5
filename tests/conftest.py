from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inference.checkpoint import save_safetensors
from pipeline.demo import make_demo_dataset
from pipeline.core.findings import CHEXNET_FINDINGS
from pipeline.inference.tiny_net import TinyCAMNet

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
NIH_SHARED = SHARED / "data" / "nih"
TINY_ARCH = "pipeline.inference.tiny_net:tiny_cam_net"


def shared_or_skip(path: Path = NIH_SHARED) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real NIH material lives in ../shared (read-only, not in the repo)")
    return path


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(b, "PNG") if mode else Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.manual_seed(7)
    net = TinyCAMNet(len(CHEXNET_FINDINGS))
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval mode matters
        net.features[-1].running_mean.uniform_(-0.5, 0.5)
        net.features[-1].running_var.uniform_(0.5, 2.0)
    save_safetensors(net.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_nih(tmp_path_factory) -> Path:
    """40 synthetic films in the ChestX-ray14 layout (two images_0XX folders)."""
    return make_demo_dataset(tmp_path_factory.mktemp("nih") / "ChestX-ray14", n=40, size=128, seed=3)
