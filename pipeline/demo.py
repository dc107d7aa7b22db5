"""The embedded default: a small synthetic dataset in the ChestX-ray14 layout and a seeded demo model.

Films are synthetic (no patient data) but read as chest films at a glance: dark air around a soft-tissue
thorax, two dark lung fields crossed by ribs, clavicles, the spine and mediastinum, the heart shadow
to the film's right (the patient's left) and the domes of the diaphragm. AP (portable) films carry a
burned-in 'PORTABLE' label in the top-left corner and, as in real pooled data, more Pneumonia and
Effusion; some positives get an opacity in a lung field (Effusion: at a lung base). The demo pools
two sites: ``hospB`` takes more portable films and stamps a laterality marker ``L`` in the top-right
corner, so the site can be read from the film and is tied to the label through the view.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.findings import CHEXNET_FINDINGS

# torch is imported where the model is built or trained: a demo rerun with its data and model in
# place imports none of it (a no-op of the demo costs what it checks; issue 23)

DEMO_VERSION = "3"
DEMO_ARCH = "pipeline.inference.tiny_net:tiny_cam_net"
# The demo's model ships with the package (trained once on the demo data by ``python -m pipeline.demo
# --write-weights``): a first demo run trains nothing, and its outputs do not depend on the training
# nondeterminism of the machine it runs on (issue 23)
SHIPPED_MODEL = "demo_model.safetensors"
WRITE_EPOCHS = 30
# (name, share of AP films, laterality marker, seed, first patient id)
DEMO_SITES = (("hospA", 0.1, False, 0, 1), ("hospB", 0.7, True, 1, 50_001))


@lru_cache(maxsize=8)
def _font(px: int):
    try:
        return ImageFont.load_default(size=px)  # Pillow's embedded scalable font (needs FreeType)
    except (TypeError, OSError):  # pragma: no cover - old Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def _stamp(img: np.ndarray, text: str, x: int, y: int, px: int) -> np.ndarray:
    """Burn white text into the film, as an X-ray marker is (value 250, thick strokes)."""
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((x, y), text, fill=250, font=_font(px), stroke_width=max(1, px // 10), stroke_fill=250)
    return np.asarray(pil)


def synthetic_film(rng: np.random.Generator, size: int, ap: bool, opacity: bool, effusion: bool = False, marker_l: bool = False) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    dx, adx = x - 0.5, np.abs(x - 0.5)
    body = 1 / (1 + np.exp(-(1 - ((dx / 0.45) ** 2 + ((y - 0.66) / 0.62) ** 2)) * 10))  # soft-tissue thorax
    shoulders = np.exp(-(((adx - 0.34) / 0.13) ** 2 + ((y - 0.12) / 0.07) ** 2))
    dome = 0.63 + 2.5 * (adx - 0.19) ** 2 + 0.03 * (dx > 0)  # the right hemidiaphragm (film's left) sits higher
    below = 1 / (1 + np.exp(-(y - dome) * 90))  # abdomen under the domes
    lung_w = 0.13 + 0.01 * rng.standard_normal()
    lungs = np.exp(-(((adx - 0.19) / lung_w) ** 4 + ((y - 0.44) / 0.3) ** 4)) * (1 - below)
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (y * 8 - 1.8 * adx ** 2))
    spine = np.exp(-((dx / 0.04) ** 4)) * (y > 0.06)
    heart = np.exp(-((((x - 0.55) / 0.14) ** 2 + ((y - 0.62) / 0.12) ** 2) ** 2))
    clavicles = np.exp(-((y - 0.19 + 0.3 * adx - 0.5 * adx ** 2) / 0.013) ** 2) * (adx < 0.33) * (adx > 0.04)
    img = 15 + 95 * body + 35 * shoulders + 45 * spine * body + 30 * below * body + 50 * clavicles
    img -= (85 - 14 * ribs) * lungs * body
    img += 85 * heart
    if opacity:
        cx, cy = rng.choice([0.33, 0.67]), rng.uniform(0.4, 0.6)
        img += 45 * np.exp(-(((x - cx) / 0.07) ** 2 + ((y - cy) / 0.08) ** 2)) * (1 + 0.2 * rng.standard_normal((size, size)))
    if effusion:
        side = rng.choice([0.3, 0.7])
        img += 70 * lungs * (np.abs(x - side) < 0.16) / (1 + np.exp(-(y - 0.62) * 40))
    img += rng.normal(0, 6, (size, size))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return _markers(img, ap, marker_l)


def _markers(img: np.ndarray, ap: bool, marker_l: bool) -> np.ndarray:
    size = img.shape[0]
    px = max(6, size // 18)
    if ap:
        img = _stamp(img, "PORTABLE", size // 24, size // 20, px)  # burned-in label, top-left
    if marker_l:
        img = _stamp(img, "L", size - size // 12 - px, size // 20, int(px * 1.6))  # laterality marker, top-right
    return img


def marker_cells(size: int = 256, grid: int = 7) -> dict[str, tuple[tuple[int, int], ...]]:
    """Which cells of the model's 7x7 grid each burned-in marker touches (drawn, then preprocessed as the
    model sees it: the films are square, so Resize(224) maps the whole film onto the crop)."""
    from pipeline.inference.images import PreprocessConfig, decode_preprocess

    cells = {}
    blank = np.zeros((size, size), np.uint8)
    for name, ap, marker_l in (("PORTABLE", True, False), ("L", False, True)):
        buf = io.BytesIO()
        Image.fromarray(_markers(blank, ap, marker_l)).save(buf, "PNG")
        px = decode_preprocess(buf.getvalue(), PreprocessConfig()).pixels[:, :, 0] > 64
        c = px.shape[0] // grid
        hit = px[: c * grid, : c * grid].reshape(grid, c, grid, c).any(axis=(1, 3))
        cells[name] = tuple((int(i), int(j)) for i, j in zip(*np.nonzero(hit)))
    return cells


def make_demo_dataset(root: str | os.PathLike, n: int = 256, size: int = 256, seed: int = 0, ap_share: float = 0.35,
                      marker_l: bool = False, first_patient: int = 1) -> Path:
    """Write ROOT/images_001/images/*.png ... and ROOT/Data_Entry_2017_v2020.csv. Idempotent."""
    root = Path(root)
    stamp = root / ".demo-complete"
    key = f"{DEMO_VERSION}:{n}:{size}:{seed}:{ap_share}:{marker_l}:{first_patient}"
    if stamp.exists() and stamp.read_text() == key:
        return root
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pid = first_patient + i // 3
        image_id = f"{pid:08d}_{i % 3:03d}.png"
        ap = rng.random() < ap_share
        labels = [f for f, p_ap, p_pa in (("Pneumonia", 0.35, 0.03), ("Effusion", 0.3, 0.08), ("Atelectasis", 0.15, 0.1)) if rng.random() < (p_ap if ap else p_pa)]
        folder = root / f"images_{1 + i * 2 // n:03d}" / "images"  # two of the twelve NIH folders
        folder.mkdir(parents=True, exist_ok=True)
        film = synthetic_film(rng, size, ap, "Pneumonia" in labels, "Effusion" in labels, marker_l)
        Image.fromarray(film).save(folder / image_id)
        rows.append([image_id, "|".join(labels) or "No Finding", i % 3, pid, int(rng.integers(18, 90)), rng.choice(["M", "F"]), "AP" if ap else "PA", size, size, 0.143, 0.143])
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        w.writerows(rows)
    ids = [r[0] for r in rows]
    (root / "train_val_list.txt").write_text("\n".join(ids[: int(0.8 * n)]) + "\n")
    (root / "test_list.txt").write_text("\n".join(ids[int(0.8 * n) :]) + "\n")
    stamp.write_text(key)
    return root


def make_demo_sites(base: str | os.PathLike, n: int = 256, size: int = 256) -> tuple[str, ...]:
    """The demo's two sites as ``--dataset`` specs (NAME=nih:ROOT), n films in all."""
    specs = []
    for name, ap_share, marker_l, seed, first in DEMO_SITES:
        root = make_demo_dataset(Path(base) / name, n // len(DEMO_SITES), size, seed, ap_share, marker_l, first)
        specs.append(f"{name}=nih:{root}")
    return tuple(specs)


def make_demo_model(path: str | os.PathLike, data_root: str | os.PathLike | list | tuple | None = None, seed: int = 0, epochs: int = 30) -> str:
    """A seeded TinyCAMNet with CheXNet's 14 outputs, saved as safetensors. Given the demo data (one
    root or several), it is first trained briefly on its labels, so it learns what the data teach it
    (the markers included)."""
    path = str(path)
    if os.path.exists(path):
        return path
    import torch

    from pipeline.inference.checkpoint import save_safetensors
    from pipeline.inference.tiny_net import TinyCAMNet

    roots = [] if data_root is None else [data_root] if isinstance(data_root, (str, os.PathLike)) else list(data_root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyCAMNet(len(CHEXNET_FINDINGS))
        if roots:
            _train(net, [Path(r) for r in roots], epochs)
    meta = {"arch": DEMO_ARCH, "seed": str(seed), "trained_epochs": str(epochs if roots else 0)}
    save_safetensors(net.state_dict(), path, meta | ({"data_digest": demo_data_digest(roots)} if roots else {}))
    return path


def shipped_model_path() -> str:
    """The demo model's weights as installed with the package (package data, see pyproject.toml)."""
    return str(resources.files("pipeline") / SHIPPED_MODEL)


def demo_data_digest(roots) -> str:
    """sha256 over the demo data a model was trained on (metadata and films, in a fixed order): the
    shipped weights record it, so a test sees when the demo data change and the weights do not."""
    h = hashlib.sha256()
    for root in sorted(Path(r) for r in roots):
        for f in [root / "Data_Entry_2017_v2020.csv", *sorted(root.glob("images_*/images/*.png"))]:
            h.update(f"{f.relative_to(root)}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def write_shipped_weights(dest: str | os.PathLike | None = None) -> str:
    """Regenerate the shipped weights: the demo's two sites in a scratch folder, then the seeded
    training, on one thread with deterministic kernels (the same bytes again on the same platform and
    torch version)."""
    import torch

    dest = str(dest or Path(__file__).with_name(SHIPPED_MODEL))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with tempfile.TemporaryDirectory(prefix="cxr-demo-weights-") as tmp:
            roots = [s.split(":", 1)[1] for s in make_demo_sites(tmp)]
            tmp_model = make_demo_model(os.path.join(tmp, SHIPPED_MODEL), data_root=roots, epochs=WRITE_EPOCHS)
            blob = canonical_safetensors(Path(tmp_model).read_bytes(), {"torch_version": torch.__version__})
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    part = f"{dest}.part"
    Path(part).write_bytes(blob)
    os.replace(part, dest)
    return dest


def canonical_safetensors(blob: bytes, extra_metadata: dict[str, str] | None = None) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes the metadata
    in hash order, so two writes of the same tensors differ in bytes. Tensor offsets are relative to
    the data after the header, so only the header changes (padded with spaces to 8 bytes, as
    safetensors does)."""
    import json

    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = {**header.get("__metadata__", {}), **(extra_metadata or {})}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def _train(net, roots: list[Path], epochs: int) -> None:
    import torch

    from pipeline.inference.images import load_image, normalize_batch

    xs, ys = [], []
    for root in roots:
        with open(root / "Data_Entry_2017_v2020.csv") as f:
            rows = list(csv.DictReader(f))
        paths = {p.name: p for p in root.glob("images_*/images/*.png")}
        xs += [load_image(str(paths[r["Image Index"]])).pixels for r in rows]
        ys += [[float(f in r["Finding Labels"].split("|")) for f in CHEXNET_FINDINGS] for r in rows]
    x = normalize_batch(torch.from_numpy(np.stack(xs)))
    y = torch.tensor(ys)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description="The demo's data and shipped model.")
    p.add_argument("--write-weights", nargs="?", const="", metavar="PATH",
                   help=f"train the demo model (seeded, about 3 min) and write it to PATH (default: the package's {SHIPPED_MODEL})")
    args = p.parse_args(argv)
    if args.write_weights is None:
        p.print_help()
        return 2
    print(write_shipped_weights(args.write_weights or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
