import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import ImageError
from pipeline.inference.images import PreprocessConfig, decode_preprocess, normalize_batch, reference_transform
from pipeline.io.reads import read_bytes

from tests.conftest import png_bytes


def _reference(img: Image.Image) -> torch.Tensor:
    return reference_transform()(img.convert("RGB"))


@pytest.mark.parametrize("shape", [(256, 256), (300, 517), (600, 250)])
def test_grayscale_matches_reference_exactly(rng, shape):
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    d = decode_preprocess(png_bytes(arr))
    assert d.pixels.shape == (224, 224, 3) and d.source_mode == "L"
    ours = normalize_batch(torch.from_numpy(d.pixels)[None])[0]
    assert torch.equal(ours, _reference(Image.fromarray(arr)))


# sizes around the edge cases of torchvision's arithmetic: already 224 on the short side, odd
# margins (the crop box's rounding), portrait and landscape, extreme aspect, smaller than 224
@pytest.mark.parametrize("size", [(224, 224), (224, 301), (301, 224), (225, 225), (223, 640), (1023, 1024),
                                  (2500, 2048), (97, 33), (17, 1900), (1, 1), (450, 449)])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_resize_crop_is_torchvisions_byte_for_byte(rng, size, mode):
    """Decoding no longer imports torchvision (decode processes start faster); its own Resize +
    CenterCrop on PIL images are the definition we must match, pixel for pixel."""
    from torchvision.transforms import functional as TF

    from pipeline.inference.images import _resize_crop

    w, h = size
    arr = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, mode)
    want = np.asarray(TF.center_crop(TF.resize(img, 224), [224, 224]))
    got = np.asarray(_resize_crop(img, 224))
    assert got.shape == want.shape == ((224, 224) if mode == "L" else (224, 224, 3))
    assert np.array_equal(got, want)


def test_decoding_imports_no_torch():
    """The decode processes' forkserver preloads the decode module: importing torch there cost
    about 2.5 s of CPU per run on the 2-core machine."""
    import subprocess
    import sys

    code = ("import sys, pipeline.worker.decode_pool, pipeline.inference.images as m; "
            "m.decode_bytes(open(sys.argv[1], 'rb').read()); "
            "print(sorted(k for k in ('torch', 'torchvision') if k in sys.modules))")
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(png_bytes(np.zeros((300, 260), np.uint8)))
        f.flush()
        out = subprocess.run([sys.executable, "-c", code, f.name], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_normalize_batch_table_is_the_operations_bit_for_bit(rng):
    """On the CPU normalize_batch gathers from a table of the 256 values; it must be the reference's
    operations exactly, for every value and channel, whatever the batch and its memory layout."""
    from pipeline.inference.images import normalize_ops

    every = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(2, 16, 16, 3).contiguous()
    batch = torch.from_numpy(rng.integers(0, 256, (5, 224, 224, 3), dtype=np.uint8))
    strided = torch.from_numpy(rng.integers(0, 256, (3, 40, 50, 6), dtype=np.uint8))[..., ::2]  # not contiguous
    for px in (every, batch, strided):
        got, want = normalize_batch(px), normalize_ops(px)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():  # as infer_batch calls it
        assert torch.equal(normalize_batch(batch), normalize_ops(batch))


def test_grayscale_planes_decode_and_normalise_as_their_three_equal_channels(rng):
    """Decode processes send a grayscale film as one plane (a third of the bytes); the batch made of
    planes normalises to exactly what the three repeated channels give, for every value."""
    from pipeline.inference.images import normalize_ops

    arr = rng.integers(0, 256, (300, 517), dtype=np.uint8)
    full, plane = decode_preprocess(png_bytes(arr)), decode_preprocess(png_bytes(arr), gray_plane=True)
    assert plane.pixels.shape == (224, 224) and plane.source_mode == "L"
    assert np.array_equal(plane.rgb(), full.pixels) and full.rgb() is full.pixels
    every = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(2, 16, 16)
    for planes in (torch.from_numpy(np.stack([plane.pixels, plane.pixels[::-1].copy()])), every):
        rgb = planes.unsqueeze(-1).expand(*planes.shape, 3).contiguous()
        got = normalize_batch(planes)
        assert torch.equal(got, normalize_batch(rgb)) and torch.equal(got, normalize_ops(rgb))
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(normalize_batch(planes.float()), normalize_ops(rgb.float()))  # the generic (device) path
    colour = rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)
    assert decode_preprocess(png_bytes(colour), gray_plane=True).pixels.shape == (224, 224, 3)  # colour stays colour


def test_a_batch_mixing_planes_and_colour_films_normalises_as_their_stacked_rgb(rng):
    """infer_batch takes a shard's films as they come (grayscale planes beside RGB films): each is
    normalised as it is, bit for bit what the stacked RGB arrays give, for every value and channel."""
    from pipeline.inference.images import normalize_films, normalize_ops

    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    films = [every, np.repeat(every[:, :, None], 3, axis=2)[:, ::-1].copy(), rng.integers(0, 256, (16, 16), dtype=np.uint8),
             rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)]
    rgb = torch.from_numpy(np.stack([f if f.ndim == 3 else np.repeat(f[:, :, None], 3, axis=2) for f in films]))
    got = normalize_films(films)
    assert got.dtype == torch.float32 and torch.equal(got, normalize_ops(rgb)) and torch.equal(got, normalize_batch(rgb))
    assert got.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="film 1"):
        normalize_films([every, every[:8]])


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


def test_a_file_that_lies_about_its_size_is_read_whole_within_the_limit(tmp_path):
    """read_bytes reads the size stat gave plus one byte; a file that says 0 bytes (/proc) or grew
    since is read on, up to --max-image-bytes and no further."""
    import os

    from pipeline.io.reads import ReadLimits

    proc = "/proc/self/cmdline"
    if not os.path.exists(proc) or os.stat(proc).st_size != 0:
        pytest.skip("needs Linux's /proc, whose files report size 0")
    want = open(proc, "rb").read()
    assert len(want) > 8 and read_bytes(proc) == want
    with pytest.raises(ImageError) as e:
        read_bytes(proc, limits=ReadLimits(max_bytes=8))
    assert e.value.error_class == "ImageTooLarge"
    f = tmp_path / "f.png"
    f.write_bytes(b"x" * 100)
    assert read_bytes(str(f)) == b"x" * 100
