"""torchxrayvision's models (`--arch xrv:...`): their output names, calibration and preprocessing,
and parity with torchxrayvision's own pipeline on real films. Tests that need the package skip
without it (the `torchxrayvision` extra); the spec-mapping and missing-extra tests never need it."""

from __future__ import annotations

import importlib.util
import os
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ConfigError, MissingExtraError
from pipeline.core.findings import CHEXNET_FINDINGS, REFERENCE_BASELINES
from pipeline.inference.architectures import ARCHITECTURES, arch_profile, check_arch
from pipeline.inference.model_spec import model_spec_for
from pipeline.inference.xrv_profiles import XRV_MODELS, job_finding

from tests.conftest import NIH_SHARED, shared_or_skip

HAVE_XRV = importlib.util.find_spec("torchxrayvision") is not None and importlib.util.find_spec("skimage") is not None
needs_xrv = pytest.mark.skipif(not HAVE_XRV, reason='torchxrayvision is not installed: pip install -e ".[torchxrayvision]"')
FILMS = ("00000075_000.png", "00000100_000.png")


def _xrv():
    with warnings.catch_warnings():  # its models module sets a process-wide "ignore" on import
        import torchxrayvision

    return torchxrayvision


# ---- the spec: torch-free, no torchxrayvision needed -------------------------------------------------

def test_every_xrv_model_is_registered_with_its_profile():
    for weights, (targets, threshs, size) in XRV_MODELS.items():
        assert len(threshs) == len(targets) == 18
        arch = f"xrv:{weights}"
        assert arch in ARCHITECTURES
        p = arch_profile(arch)
        assert (p.preprocess, p.input_size, p.targets, len(p.op_threshs)) == ("xrv", size, targets, 18)
    assert arch_profile("densenet121").preprocess == "chexnet" and arch_profile("x.y:z").targets == ()


def test_findings_map_onto_the_models_outputs_and_empty_ones_are_dropped():
    spec = model_spec_for("xrv:densenet121-res224-all", "random:0", CHEXNET_FINDINGS)
    targets = XRV_MODELS["densenet121-res224-all"][0]
    assert spec.findings == CHEXNET_FINDINGS  # all 14 NIH findings, in the job's order
    assert [targets[i] for i in spec.outputs] == list(CHEXNET_FINDINGS)
    assert spec.op_threshs[spec.findings.index("Hernia")] == pytest.approx(0.042889766)
    assert (spec.preprocess, spec.input_size) == ("xrv", 224)
    # CheXpert's model has no Infiltration, Emphysema, Fibrosis, Pleural_Thickening, Nodule, Mass, Hernia
    chex = model_spec_for("xrv:densenet121-res224-chex", "random:0", CHEXNET_FINDINGS)
    assert chex.findings == ("Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax", "Consolidation", "Edema")
    d = chex.describe()
    assert "(unused output 2)" in d["dropped_outputs"] and "Lung Opacity" in d["dropped_outputs"]
    assert d["finding_outputs"]["Cardiomegaly"] == {"output": 10, "model_name": "Cardiomegaly"}
    # a finding beyond NIH's 14 is scored when asked for
    extra = model_spec_for("xrv:densenet121-res224-all", "random:0", ("Lung Opacity", "Effusion"))
    assert extra.outputs == (16, 7)
    with pytest.raises(ConfigError, match="no output for any of --findings"):
        model_spec_for("xrv:densenet121-res224-rsna", "random:0", ("Hernia",))
    from pipeline.config.run_config import ScoreConfig

    with pytest.raises(ConfigError, match="its outputs are Pneumonia, Lung Opacity"):  # when the configuration is built
        ScoreConfig.from_dict({"model": {"arch": "xrv:densenet121-res224-rsna", "findings": ["Hernia"]}})
    # resnet50's Lung Lesion has no operating point: None, never NaN (a spec must equal its own copy)
    rn = model_spec_for("xrv:resnet50-res512-all", "random:0", ("Lung Lesion", "Fracture"))
    assert rn.op_threshs == (None, 0.5080557) and rn.input_size == 512
    import pickle

    assert pickle.loads(pickle.dumps(rn)) == rn and hash(pickle.loads(pickle.dumps(rn))) == hash(rn)


def test_other_spellings_of_a_finding_map_onto_the_jobs_name():
    assert job_finding("Infiltrate") == "Infiltration"
    assert job_finding("Pleural Thickening") == "Pleural_Thickening"
    assert job_finding("Pleural Effusion") == "Effusion"
    assert job_finding("Lung Opacity") == "Lung Opacity" and job_finding("") == ""


def test_chexnet_style_specs_are_unchanged():
    spec = model_spec_for("densenet121", "random:0", CHEXNET_FINDINGS)
    assert (spec.outputs, spec.op_threshs, spec.preprocess, spec.input_size) == ((), (), "chexnet", 224)
    assert not spec.calibrated


def test_without_the_package_an_xrv_arch_fails_validation_naming_the_extra(monkeypatch, tmp_path, tiny_nih, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchxrayvision" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[torchxrayvision\]"'):
        check_arch("xrv:densenet121-res224-all")
    check_arch("xrv:densenet121-res224-all", find_module=False)  # the value itself is valid
    from jobs.score_dataset import main

    rc = main(["--dataset", f"nih:{tiny_nih}", "--checkpoint", "random:0", "--arch", "xrv:densenet121-res224-all",
               "--out", str(tmp_path / "out")])
    assert rc != 0
    assert '.[torchxrayvision]' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ---- against the package -----------------------------------------------------------------------------

@needs_xrv
def test_the_profiles_are_torchxrayvisions_own():
    urls = _xrv().models.model_urls
    for weights, (targets, threshs, size) in XRV_MODELS.items():
        assert tuple(urls[weights]["labels"]) == targets
        assert urls[weights]["input_resolution"] == size
        theirs = [float(t) for t in urls[weights]["op_threshs"]]
        assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(theirs, threshs)), weights


@needs_xrv
def test_op_norm_is_torchxrayvisions_where_there_is_an_operating_point():
    import torch

    from pipeline.inference.cam import op_norm

    p = torch.tensor([[0.001, 0.05, 0.3, 0.9999, 0.2], [0.5, 0.01, 0.0749, 0.07, 0.6]], dtype=torch.float64)
    t = torch.tensor([0.07422872, 0.038290843, 0.5, 0.2, math.nan], dtype=torch.float64)
    ours = op_norm(p, t)
    theirs = _xrv().models.op_norm(p.float(), t.float()).double()
    assert torch.allclose(ours[:, :4], theirs[:, :4], atol=1e-6)
    assert torch.equal(ours[:, 4], p[:, 4])  # no operating point: left as it is (torchxrayvision: 0.5)
    assert torch.all(torch.diff(op_norm(torch.linspace(0, 1, 101, dtype=torch.float64)[:, None], t[:1])[:, 0]) > 0)


def _films(n: int) -> list[str]:
    root = shared_or_skip(NIH_SHARED / "images")
    names = list(FILMS[:n]) if n <= len(FILMS) else sorted(p.name for p in Path(root).glob("*.png"))[:n]
    return [str(Path(root) / f) for f in names]


def _xrv_input(path: str, size: int):
    """torchxrayvision's own pipeline: xrv.datasets.normalize, XRayCenterCrop, XRayResizer."""
    import skimage.io
    import torchvision

    xrv = _xrv()
    img = xrv.datasets.normalize(skimage.io.imread(path), 255, reshape=True)
    return torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(size)])(img)


def xrv_checkpoint(arch: str, films: list[str], path: Path, seed: int = 0) -> dict:
    """Seeded random weights of ``arch`` made to behave like a trained network's: BatchNorm statistics
    from one pass over ``films`` and a classifier scaled to logits within about +-3 (untrained, the
    logits are in the hundreds and every probability is 0 or 1). Saved as safetensors at ``path``."""
    import torch

    from pipeline.inference.architectures import build_arch
    from pipeline.inference.checkpoint import save_safetensors

    size = arch_profile(arch).input_size
    torch.manual_seed(seed)
    net = build_arch(arch, 18)
    x = torch.from_numpy(np.stack([_xrv_input(f, size) for f in films]))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.momentum = 1.0
        net.train()
        net.features(x)
        net.eval()
        pooled = torch.relu(net.features(x)).mean((2, 3))
        logits = pooled @ net.classifier.weight.T
        net.classifier.weight.mul_(3.0 / logits.abs().max().clamp_min(1e-6))
        net.classifier.bias.uniform_(-2.5, 0.5, generator=torch.Generator().manual_seed(seed))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    save_safetensors(state, str(path))
    return state


def _reference_model(arch: str, state: dict, tmp_path: Path, monkeypatch):
    """torchxrayvision's own model with these weights and its own calibration."""
    import torch

    xrv = _xrv()
    weights = arch.split(":", 1)[1]
    if weights.startswith("densenet"):
        net = xrv.models.DenseNet(weights=None)
        net.load_state_dict(state)
        net.op_threshs = torch.tensor(xrv.models.model_urls[weights]["op_threshs"])  # as it sets them after loading
    else:  # its ResNet cannot be built without its weights file: hand it ours
        f = tmp_path / "xrv-resnet.pt"
        torch.save(state, f)
        monkeypatch.setattr(xrv.models, "get_weights", lambda *a, **k: str(f))
        net = xrv.models.ResNet(weights=weights)
    return net.eval()


def parity(arch: str, films: list[str], tmp_path: Path, monkeypatch) -> dict:
    """The job's decode + infer_batch against torchxrayvision's pipeline + forward, and the maps
    against the reference formula on the model's own features. Returns the largest differences."""
    import torch

    from pipeline.inference.cam import infer_batch
    from pipeline.inference.images import load_image
    from pipeline.inference.model import load_model
    from pipeline.config.run_config import ScoreConfig

    ckpt = tmp_path / f"{arch.split(':')[1]}.safetensors"
    if ckpt.exists():  # the slow test's later batches: the same weights
        from safetensors.torch import load_file

        state = load_file(str(ckpt))
    else:
        state = xrv_checkpoint(arch, films[:2], ckpt)
    spec = model_spec_for(arch, str(ckpt), CHEXNET_FINDINGS)
    model = load_model(spec)
    ref = _reference_model(arch, state, tmp_path, monkeypatch)
    base = tuple(REFERENCE_BASELINES[f] for f in spec.findings)
    pre = ScoreConfig.from_dict({"model": {"arch": arch, "checkpoint": str(ckpt)}}).preprocess()
    decoded = [load_image(f, pre).pixels for f in films]
    out = infer_batch(model, decoded, base)
    x = torch.from_numpy(np.stack([_xrv_input(f, spec.input_size) for f in films]))
    with torch.no_grad():
        theirs = ref(x)[:, list(spec.outputs)].numpy()
        fmap = torch.relu(ref.features(x) if hasattr(ref, "classifier") else _resnet_fmap(ref, x)).double()
    w = state[_clf_key(arch)].double()[list(spec.outputs)]
    b = state[_clf_key(arch).replace("weight", "bias")].double()[list(spec.outputs)]
    maps = np.empty_like(out.cam)
    for n in range(len(films)):
        for k, p_base in enumerate(base):
            for i in range(fmap.shape[2]):
                for j in range(fmap.shape[3]):
                    z = float(w[k] @ fmap[n, :, i, j] + b[k])
                    maps[n, k, i, j] = math.log((1.0 / (1.0 + math.exp(-z))) / p_base)
    return {"pixels": max(float(np.abs(d - x[n, 0].numpy()).max()) for n, d in enumerate(decoded)),
            "prob": float(np.abs(out.prob - theirs).max()), "map": float(np.abs(out.cam - maps).max()),
            "grid": tuple(out.cam.shape[2:]), "spread": (float(theirs.min()), float(theirs.max())), "spec": spec}


def _clf_key(arch: str) -> str:
    return "classifier.weight" if "densenet" in arch else "fc.weight"


def _resnet_fmap(ref, x):
    m = ref.model
    for layer in (m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4):
        x = layer(x)
    return x


@needs_xrv
def test_densenet_parity_with_torchxrayvision_on_real_films(tmp_path, monkeypatch):
    r = parity("xrv:densenet121-res224-all", _films(2), tmp_path, monkeypatch)
    assert r["pixels"] == 0.0  # the same preprocessing, bit for bit
    assert r["prob"] <= 1e-5, r
    assert r["map"] <= 1e-4, r
    assert r["grid"] == (7, 7)
    lo, hi = r["spread"]
    assert lo < 0.3 and hi > 0.7  # probabilities on both sides of the operating points: the test can fail


@needs_xrv
def test_resnet_parity_with_torchxrayvision_on_a_real_film(tmp_path, monkeypatch):
    r = parity("xrv:resnet50-res512-all", _films(1), tmp_path, monkeypatch)
    assert r["pixels"] == 0.0
    assert r["prob"] <= 1e-5, r
    assert r["map"] <= 1e-4, r
    assert r["grid"] == (16, 16)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@needs_xrv
@pytest.mark.parametrize("arch", ["xrv:densenet121-res224-all", "xrv:resnet50-res512-all"])
def test_parity_on_all_shared_films(arch, tmp_path, monkeypatch):
    films = _films(120)
    assert len(films) == 120
    worst = {"prob": 0.0, "map": 0.0}
    for i in range(0, 120, 8):
        r = parity(arch, films[i:i + 8], tmp_path, monkeypatch)
        worst = {k: max(worst[k], r[k]) for k in worst}
    print(f"{arch}: largest differences on 120 films {worst}")
    assert worst["prob"] <= 1e-5 and worst["map"] <= 1e-4, worst


@needs_xrv
def test_a_resnet_run_writes_16x16_maps_and_its_aggregates_and_report_follow_the_grid(tmp_path, report_after_run):
    import json

    import pyarrow.parquet as pq
    import zarr

    from jobs.score_dataset import main

    ckpt = tmp_path / "rn.safetensors"
    xrv_checkpoint("xrv:resnet50-res512-all", _films(2), ckpt)
    out = tmp_path / "out"
    assert main(["--dataset", f"nih:{shared_or_skip()}", "--checkpoint", str(ckpt), "--arch", "xrv:resnet50-res512-all",
                 "--out", str(out), "--limit", "2", "--shard-size", "2", "--batch-size", "2",
                 "--cluster", "inprocess"]) == 0  # not about the cluster: a worker process would import torch and load ResNet-50 again
    run_dir = next((out / "runs").iterdir())
    g = zarr.open_group(str(run_dir / "maps.zarr"), mode="r")
    assert g["cam"].shape[2:] == (16, 16) and g["cell_features"].shape[1] == 256 and g["embedding"].shape[1] == 2048
    assert np.isfinite(g["cam"][:2]).all()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["identity"]["grid"] == [16, 16]
    assert run["identity"]["preprocess"] == {"size": 512, "high_bit_depth": "clip", "method": "xrv"}
    assert run["model"]["finding_outputs"]["Infiltration"] == {"output": 2, "model_name": "Infiltration"}
    assert "Lung Lesion" in run["model"]["dropped_outputs"] and run["model"]["op_threshs"]["Hernia"] == pytest.approx(0.5020846)
    assert "op_norm" in run["model"]["map"]
    rs = pq.read_table(run_dir / "region_stats.parquet").to_pandas()
    assert (rs.cell_row.max(), rs.cell_col.max()) == (15, 15)
    assert len(rs[(rs.finding == "Effusion") & (rs.stratum == "all")]) == 256
    from pipeline.analysis.aggregate import AggregateConfig, aggregate_run

    fs = aggregate_run(str(out), config=AggregateConfig(min_n=1))["finding_summary"].to_pandas()  # 2 films: below the default min_n
    assert fs.pos_share_ring.notna().any() and fs.pos_share_inner.notna().any()
    sep = pq.read_table(run_dir / "cell_separation.parquet").to_pandas()
    assert sep.empty or sep.cell_col.max() == 15
    report = (run_dir / "report.html").read_text()
    assert "16x16 grids per finding" in report and "The model is calibrated" in report


@needs_xrv
def test_a_pickled_torchxrayvision_model_converts_and_loads_into_its_spec(tmp_path, capsys):
    """torchxrayvision's DenseNet files are whole pickled models (of torch < 1.6: no
    _non_persistent_buffers_set); convert_checkpoint --trust-pickle turns one into safetensors."""
    import torch

    from jobs.convert_checkpoint import main as convert
    from pipeline.inference.model import load_model

    torch.manual_seed(3)
    net = _xrv().models.DenseNet(weights=None, op_threshs=torch.tensor(XRV_MODELS["densenet121-res224-nih"][1], dtype=torch.float32))
    for mod in net.modules():
        del mod._non_persistent_buffers_set  # as an old pickle has them
    pickled, converted = tmp_path / "nih-densenet121.pt", tmp_path / "nih.safetensors"
    torch.save(net, pickled)
    assert convert(["--trust-pickle", str(pickled), str(converted)]) == 0
    model = load_model(model_spec_for("xrv:densenet121-res224-nih", str(converted), CHEXNET_FINDINGS))
    assert torch.equal(model.features.conv0.weight, net.features.conv0.weight)
    k = model.findings.index("Cardiomegaly")
    assert torch.equal(model.classifier.weight[k], net.classifier.weight[10])  # its output 10
    assert model.classifier.out_features == 14


@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("1", "true", "yes"), reason="only under CI, which installs the extra")
def test_ci_installs_torchxrayvision_so_the_parity_tests_run():
    # the skips above hide no work in CI: .ci/run installs .[test,torchxrayvision]
    assert HAVE_XRV, '.ci/run must install the torchxrayvision extra (pip install -e ".[test,torchxrayvision]")'
