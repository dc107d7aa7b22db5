import glob

import numpy as np
import pytest
import torch

from pipeline.inference.cam import infer_batch
from pipeline.core.findings import CHEXNET_FINDINGS, REFERENCE_BASELINES
from pipeline.inference.images import load_image
from pipeline.inference.model import ModelSpec, load_model
from pipeline.inference.reference import reference_image

from tests.conftest import TINY_ARCH, shared_or_skip

BASE = tuple(REFERENCE_BASELINES[f] for f in CHEXNET_FINDINGS)


def _net(model):
    # Rebuild the full network around the loaded parts for the model's own forward.
    from pipeline.inference.model import build_arch

    net = build_arch(model.spec.arch, len(model.findings))
    net.features, net.classifier = model.features, model.classifier
    return net.eval()


def test_logit_is_mean_of_cell_logits_and_maps_match_formula(tiny_ckpt, rng):
    model = load_model(ModelSpec(TINY_ARCH, tiny_ckpt))
    px = rng.integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    out = infer_batch(model, px, BASE)
    assert out.cam.shape == (5, 14, 7, 7) and out.embedding.shape == (5, 32) and out.embedding.dtype == np.float16
    logit = np.log(out.prob / (1 - out.prob))
    np.testing.assert_allclose(out.cell_logit.mean(axis=(2, 3)), logit, atol=1e-4)
    expected_cam = np.log(1 / (1 + np.exp(-out.cell_logit.astype(np.float64))) / np.asarray(BASE)[None, :, None, None])
    np.testing.assert_allclose(out.cam, expected_cam, atol=1e-5)
    # exact additive decomposition: bias + sum of cell contributions == logit
    b = model.classifier.bias.detach().numpy()
    contrib = (out.cell_logit - b[None, :, None, None]) / 49
    np.testing.assert_allclose(b + contrib.sum(axis=(2, 3)), logit, atol=1e-4)


def test_batch_results_do_not_depend_on_batch_composition(tiny_ckpt, rng):
    model = load_model(ModelSpec(TINY_ARCH, tiny_ckpt))
    px = rng.integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    whole = infer_batch(model, px, BASE)
    single = infer_batch(model, px[2:3], BASE)
    np.testing.assert_allclose(whole.cam[2], single.cam[0], atol=1e-5)


def test_a_list_of_planes_and_colour_films_gives_the_stacked_batch_outputs(tiny_ckpt, rng):
    """score_shard hands infer_batch its films as decoded (grayscale planes beside RGB films)."""
    model = load_model(ModelSpec(TINY_ARCH, tiny_ckpt))
    films = [rng.integers(0, 256, (224, 224), dtype=np.uint8), rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]
    stacked = infer_batch(model, np.stack([films[0][:, :, None].repeat(3, axis=2), films[1]]), BASE)
    listed = infer_batch(model, films, BASE)
    for name in ("prob", "cam", "cell_logit", "embedding", "cell_features"):
        assert np.array_equal(getattr(listed, name), getattr(stacked, name)), name


def _parity(paths, atol=1e-4):
    torch.manual_seed(0)
    model = load_model(ModelSpec("densenet121", "random:11")).to(torch.device("cpu"))  # as the job does
    net = _net(model)
    pixels = np.stack([load_image(p).pixels for p in paths])
    out = infer_batch(model, pixels, BASE)
    worst_p = worst_m = 0.0
    for n, p in enumerate(paths):
        prob, maps = reference_image(net, model.classifier, p, BASE, features_per_finding=False)
        worst_p = max(worst_p, float(np.abs(out.prob[n] - np.asarray(prob)).max()))
        worst_m = max(worst_m, float(np.abs(out.cam[n] - np.asarray(maps)).max()))
    assert worst_p < atol, worst_p
    assert worst_m < atol, worst_m


def test_parity_with_reference_on_real_films_subset():
    root = shared_or_skip()
    paths = sorted(glob.glob(str(root / "images" / "*.png")))
    # One of each kind of film in ../shared: a PA film, an RGBA PA film, an AP portable with its
    # burned-in marker (the float64 reference costs ~2 s a film; all 120 run under -m slow).
    pick = [p for p in paths if p.endswith(("00000075_000.png", "00000100_000.png", "00000404_000.png"))]
    assert len(pick) == 3
    _parity(pick)


@pytest.mark.slow
def test_parity_with_reference_on_all_real_films():
    root = shared_or_skip()
    paths = sorted(glob.glob(str(root / "images" / "*.png")))
    assert len(paths) == 120
    for i in range(0, len(paths), 20):
        _parity(paths[i : i + 20])


def test_reference_gives_the_same_maps_with_features_once_or_per_finding(tiny_ckpt, tmp_path, rng):
    from PIL import Image

    path = tmp_path / "f.png"
    Image.fromarray(rng.integers(0, 256, (64, 80), dtype=np.uint8)).save(path)
    model = load_model(ModelSpec(TINY_ARCH, tiny_ckpt))
    net = _net(model)
    slow = reference_image(net, model.classifier, str(path), BASE)
    fast = reference_image(net, model.classifier, str(path), BASE, features_per_finding=False)
    assert slow == fast
    px = np.stack([load_image(str(path)).pixels])
    out = infer_batch(model, px, BASE)
    assert np.abs(out.cam[0] - np.asarray(slow[1])).max() < 1e-4
