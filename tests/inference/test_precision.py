"""--precision: parity of each mode against a float64 reference, and precision in the run's identity."""

import copy
import glob

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.inference.cam import infer_batch
from pipeline.core.errors import ConfigError
from pipeline.core.findings import CHEXNET_FINDINGS, REFERENCE_BASELINES
from pipeline.inference.images import load_image, reference_transform
from pipeline.inference.model import ModelSpec, build_arch, load_model
from pipeline.inference.precision import PARITY_TOLERANCE, PRECISIONS, precision_mode, run_version
from pipeline.run.scoring import ScoreConfig, prepare_run

from tests.conftest import TINY_ARCH, shared_or_skip

BASE = tuple(REFERENCE_BASELINES[f] for f in CHEXNET_FINDINGS)


def float64_reference(model, paths):
    """The reference pipeline (PIL, torchvision transforms, the model's own forward) in float64."""
    net = build_arch(model.spec.arch, len(model.findings))
    net.features, net.classifier = copy.deepcopy(model.features), copy.deepcopy(model.classifier)
    net = net.eval().double().to(memory_format=torch.contiguous_format)
    x = torch.stack([reference_transform()(Image.open(p).convert("RGB")) for p in paths]).double()
    with torch.no_grad():
        prob = torch.sigmoid(net(x))
        fmap = F.relu(net.features(x))
        z = torch.einsum("bdhw,fd->bfhw", fmap, net.classifier.weight) + net.classifier.bias.view(1, -1, 1, 1)
        cam = torch.log(torch.sigmoid(z) / torch.tensor(BASE, dtype=torch.float64).view(1, -1, 1, 1))
    return prob.numpy(), cam.numpy()


def _films(n):
    root = shared_or_skip()
    paths = sorted(glob.glob(str(root / "images" / "*.png")))
    rgba = [p for p in paths if p.endswith("00000100_000.png")]  # an RGBA film too
    return paths[: n - 1] + rgba


def _max_errors(device, precision, paths, reference=None, model=None):
    model = (model or load_model(ModelSpec("densenet121", "random:11"))).to(torch.device(device))
    ref_prob, ref_cam = reference or float64_reference(load_model(ModelSpec("densenet121", "random:11")), paths)
    pixels = np.stack([load_image(p).pixels for p in paths])
    out = infer_batch(model, pixels, BASE, precision=precision)
    return float(np.abs(out.prob - ref_prob).max()), float(np.abs(out.cam - ref_cam).max())


@pytest.fixture(scope="module")
def films_and_reference():
    paths = _films(2)
    model = load_model(ModelSpec("densenet121", "random:11"))  # one for every precision: loading it is most of the cost
    return paths, float64_reference(model, paths), model  # (the reference works on a copy)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_parity_at_each_precision_on_cpu_against_float64(precision, films_and_reference):
    # measured on 4 real films: fp32 and tf32 8e-8 / 2e-6 (prob / map), bf16 1.1e-3 / 1.2e-2
    paths, reference, model = films_and_reference
    err_p, err_m = _max_errors("cpu", precision, paths, reference, model)
    tol = PARITY_TOLERANCE[precision]
    assert err_p <= tol and err_m <= tol, (precision, err_p, err_m)
    if precision == "bf16":
        # bf16 really ran reduced: its error is orders above strict fp32's (~1e-6)
        assert max(err_p, err_m) > 1e-4, (err_p, err_m)


def test_run_version_and_bad_precision():
    assert run_version("0123456789abcdef", "fp32") == "0123456789abcdef"
    assert run_version("0123456789abcdef", "bf16") == "0123456789abcdef-bf16"
    assert len({run_version("v", p) for p in PRECISIONS}) == len(PRECISIONS)
    with pytest.raises(ConfigError, match="--precision"):
        run_version("v", "fp16")
    with pytest.raises(ConfigError, match="--precision"):
        ScoreConfig.of(datasets=("nih:x",), out="o", checkpoint="random:0", precision="half")


def test_precision_is_part_of_the_run_identity(tiny_nih, tiny_ckpt, tmp_path):
    out = str(tmp_path / "out")
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = ScoreConfig.of(datasets=(f"nih:{tiny_nih}",), out=out, checkpoint=tiny_ckpt, arch=TINY_ARCH, shard_size=16,
                          precision=precision, cache="none", device="cpu")
        runs[precision] = prepare_run(cfg)
    a, b = runs["fp32"].spec, runs["bf16"].spec
    assert a.run_url != b.run_url and b.model_version == a.model_version + "-bf16"
    assert a.output_identity()["precision"] == "fp32" and b.output_identity()["precision"] == "bf16"
    import json

    for spec in (a, b):
        with open(f"{spec.run_url}/run.json") as f:
            rj = json.load(f)
        assert rj["precision"] == spec.precision == rj["identity"]["precision"] == rj["config"]["precision"]


def test_precision_mode_restores_cuda_flags_and_is_a_no_op_on_cpu():
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) \
        if hasattr(torch.backends.cudnn, "conv") else (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with precision_mode("fp32", torch.device("cuda")):
        inside = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) \
            if hasattr(torch.backends.cudnn, "conv") else (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    after = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) \
        if hasattr(torch.backends.cudnn, "conv") else (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    assert inside in (("ieee", "ieee"), (False, False)), inside
    assert after == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parity_on_cuda_at_default_precision():
    """Strict fp32 on CUDA (TF32 off): <= 1e-4 on the shared films, as on the CPU."""
    root = shared_or_skip()
    paths = sorted(glob.glob(str(root / "images" / "*.png")))[:16]
    err_p, err_m = _max_errors("cuda", "fp32", paths)
    assert err_p <= 1e-4 and err_m <= 1e-4, (err_p, err_m)
