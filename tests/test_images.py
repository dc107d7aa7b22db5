import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import ImageError
from pipeline.inference.images import PreprocessConfig, decode_preprocess, normalize_batch, read_bytes, reference_transform

from .conftest import png_bytes


def _reference(img: Image.Image) -> torch.Tensor:
    return reference_transform()(img.convert("RGB"))


@pytest.mark.parametrize("shape", [(256, 256), (300, 517), (600, 250)])
def test_grayscale_matches_reference_exactly(rng, shape):
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    d = decode_preprocess(png_bytes(arr))
    assert d.pixels.shape == (224, 224, 3) and d.source_mode == "L"
    ours = normalize_batch(torch.from_numpy(d.pixels)[None])[0]
    assert torch.equal(ours, _reference(Image.fromarray(arr)))


def test_rgb_and_rgba_match_reference(rng):
    rgba = rng.integers(0, 256, (240, 260, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the reference ignores alpha, so must we
    d = decode_preprocess(png_bytes(rgba))
    assert d.source_mode == "RGBA"
    ours = normalize_batch(torch.from_numpy(d.pixels)[None])[0]
    assert torch.equal(ours, _reference(Image.fromarray(rgba)))
    rgb = rgba[..., :3].copy()
    assert np.array_equal(decode_preprocess(png_bytes(rgb)).pixels, d.pixels)


def test_sixteen_bit_clip_is_reference_and_rescale_uses_range():
    a = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    data = png_bytes(a)
    clip = decode_preprocess(data, PreprocessConfig(high_bit_depth="clip"))
    assert clip.source_mode.startswith("I")
    ref = _reference(Image.open(__import__("io").BytesIO(data)))
    assert torch.equal(normalize_batch(torch.from_numpy(clip.pixels)[None])[0], ref)
    assert (clip.pixels == 255).mean() > 0.95  # what the reference does: nearly white
    resc = decode_preprocess(data, PreprocessConfig(high_bit_depth="rescale"))
    assert resc.pixels.min() <= 2 and resc.pixels.max() >= 253
    assert 100 < resc.pixels.mean() < 155


def test_bad_images_raise_typed_errors(tmp_path):
    good = png_bytes(np.zeros((64, 64), np.uint8) + 100)
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"this is not an image\n" * 10)
    cases = {"trunc.png": "decode", "empty.png": "read", "text.png": "decode", "missing.png": "read"}
    for name, stage in cases.items():
        with pytest.raises(ImageError) as e:
            decode_preprocess(read_bytes(str(tmp_path / name)))
        assert e.value.stage == stage, name


def test_invalid_high_bit_depth_mode():
    with pytest.raises(ValueError, match="high_bit_depth"):
        PreprocessConfig(high_bit_depth="stretch")
