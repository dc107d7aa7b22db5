"""The demo's model ships with the package: trained once on the demo data by ``python -m
pipeline.demo --write-weights``, never on a user's first run (issue 23)."""

import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import pipeline.demo as demo
from pipeline.core.findings import CHEXNET_FINDINGS
from pipeline.inference.checkpoint import read_state_dict
from pipeline.inference.checkpoint_header import check_header
from pipeline.inference.tiny_net import TinyCAMNet

ROOT = Path(__file__).resolve().parents[1]


def _meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_the_shipped_weights_are_package_data_and_are_the_trained_tiny_net():
    path = Path(demo.shipped_model_path())
    assert path.parent == Path(demo.__file__).parent and path.stat().st_size < 64_000  # a few tens of KB, no more
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert path.name in package_data["pipeline"]  # a non-editable install carries it
    check_header(str(path), demo.DEMO_ARCH, CHEXNET_FINDINGS)  # the job's own refusal check passes
    net = TinyCAMNet(len(CHEXNET_FINDINGS))
    net.load_state_dict(read_state_dict(str(path)), strict=True)
    meta = _meta(path)
    assert meta["arch"] == demo.DEMO_ARCH and meta["trained_epochs"] == str(demo.WRITE_EPOCHS) and meta["seed"] == "0"
    fresh = TinyCAMNet(len(CHEXNET_FINDINGS)).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in net.state_dict().items())  # trained, not a fresh init
    assert net.state_dict()["features.7.num_batches_tracked"].item() > 0


def test_the_demo_uses_the_shipped_weights_trained_on_todays_demo_data(tmp_path, monkeypatch):
    """The demo's configuration trains nothing, and the data it lays out are those the weights were
    trained on (change the demo data without `--write-weights` and this fails)."""
    from jobs.score_dataset import demo_config

    def no_training(*a, **k):
        raise AssertionError("the demo trained its model")

    monkeypatch.setattr(demo, "_train", no_training)
    monkeypatch.chdir(tmp_path)
    cfg = demo_config()
    assert cfg.model.checkpoint == demo.shipped_model_path() and cfg.model.arch == demo.DEMO_ARCH
    roots = [d.split(":", 1)[1] for d in cfg.data.datasets]
    assert all(Path(r).resolve().is_relative_to(tmp_path.resolve()) for r in roots)
    assert demo.demo_data_digest(roots) == _meta(demo.shipped_model_path())["data_digest"]


def test_canonical_safetensors_sorts_the_header_and_keeps_the_tensors(tmp_path):
    from pipeline.inference.checkpoint import save_safetensors

    state = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    save_safetensors(state, str(tmp_path / "x.safetensors"), {"z": "1", "y": "2", "x": "3"})
    blob = demo.canonical_safetensors((tmp_path / "x.safetensors").read_bytes(), {"w": "4"})
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0 and blob[8:8 + n].rstrip().startswith(b'{"__metadata__":{"w":"4","x":"3","y":"2","z":"1"},"a":')
    (tmp_path / "y.safetensors").write_bytes(blob)
    again = read_state_dict(str(tmp_path / "y.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in state.items())


@pytest.mark.slow
@pytest.mark.timeout(1800)  # one thread: minutes on a loaded 2-core machine
def test_regenerating_the_shipped_weights_gives_the_same_bytes(tmp_path):
    """Seeded, one thread, deterministic kernels: the same bytes again under the torch version that
    wrote them (about a minute on 2 cores). Another torch version may round differently: then the
    outputs must still agree closely."""
    shipped = Path(demo.shipped_model_path())
    fresh = Path(demo.write_shipped_weights(tmp_path / "again.safetensors"))
    if _meta(shipped).get("torch_version") == torch.__version__:
        assert fresh.read_bytes() == shipped.read_bytes()
    nets = []
    for p in (shipped, fresh):
        net = TinyCAMNet(len(CHEXNET_FINDINGS)).eval()
        net.load_state_dict(read_state_dict(str(p)))
        nets.append(net)
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(nets[0](x), nets[1](x), atol=1e-3, rtol=1e-3)
