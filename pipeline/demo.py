"""The embedded default: a small synthetic dataset in the ChestX-ray14 layout and a seeded demo model.

Films are synthetic (no patient data): a dark thorax-like ellipse, lung fields, noise. AP films carry
a bright burned-in block in the top-left corner (the 'PORTABLE' label proxy) and, as in real pooled
data, more Pneumonia and Effusion; some positives get a bright opacity in a lung field.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import save_safetensors
from .findings import CHEXNET_FINDINGS
from .tiny_net import TinyCAMNet

DEMO_VERSION = "1"


def synthetic_film(rng: np.random.Generator, size: int, ap: bool, opacity: bool) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.5) ** 2) ** 2)
    lungs = np.exp(-(((np.abs(x - 0.5) - 0.18) / 0.12) ** 2 + ((y - 0.45) / 0.25) ** 2))
    img = 40 + 150 * body - 90 * lungs + rng.normal(0, 8, (size, size))
    if opacity:
        cx, cy = rng.choice([0.32, 0.68]), rng.uniform(0.4, 0.6)
        img += 90 * np.exp(-(((x - cx) / 0.07) ** 2 + ((y - cy) / 0.07) ** 2))
    if ap:
        s = size // 8
        img[s // 2 : s // 2 + s // 2, s // 2 : s // 2 + s] = 250  # burned-in marker, top-left
    return np.clip(img, 0, 255).astype(np.uint8)


def make_demo_dataset(root: str | os.PathLike, n: int = 256, size: int = 256, seed: int = 0) -> Path:
    """Write ROOT/images_001/images/*.png ... and ROOT/Data_Entry_2017_v2020.csv. Idempotent."""
    root = Path(root)
    stamp = root / ".demo-complete"
    if stamp.exists() and stamp.read_text() == f"{DEMO_VERSION}:{n}:{size}:{seed}":
        return root
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pid = 1 + i // 3
        image_id = f"{pid:08d}_{i % 3:03d}.png"
        ap = rng.random() < 0.35
        labels = [f for f, p_ap, p_pa in (("Pneumonia", 0.35, 0.03), ("Effusion", 0.3, 0.08), ("Atelectasis", 0.15, 0.1)) if rng.random() < (p_ap if ap else p_pa)]
        folder = root / f"images_{1 + i * 2 // n:03d}" / "images"  # two of the twelve NIH folders
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_film(rng, size, ap, "Pneumonia" in labels or "Effusion" in labels)).save(folder / image_id)
        rows.append([image_id, "|".join(labels) or "No Finding", i % 3, pid, int(rng.integers(18, 90)), rng.choice(["M", "F"]), "AP" if ap else "PA", size, size, 0.143, 0.143])
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        w.writerows(rows)
    ids = [r[0] for r in rows]
    (root / "train_val_list.txt").write_text("\n".join(ids[: int(0.8 * n)]) + "\n")
    (root / "test_list.txt").write_text("\n".join(ids[int(0.8 * n) :]) + "\n")
    stamp.write_text(f"{DEMO_VERSION}:{n}:{size}:{seed}")
    return root


def make_demo_model(path: str | os.PathLike, data_root: str | os.PathLike | None = None, seed: int = 0, epochs: int = 30) -> str:
    """A seeded TinyCAMNet with CheXNet's 14 outputs, saved as safetensors. Given the demo data, it is
    first trained briefly on its labels, so it learns what the data teach it (the AP marker included)."""
    path = str(path)
    if os.path.exists(path):
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyCAMNet(len(CHEXNET_FINDINGS))
        if data_root is not None:
            _train(net, Path(data_root), epochs)
    save_safetensors(net.state_dict(), path, {"arch": "pipeline.tiny_net:tiny_cam_net", "seed": str(seed), "trained_epochs": str(epochs if data_root else 0)})
    return path


def _train(net: TinyCAMNet, root: Path, epochs: int) -> None:
    from .images import load_image, normalize_batch

    with open(root / "Data_Entry_2017_v2020.csv") as f:
        rows = list(csv.DictReader(f))
    paths = {p.name: p for p in root.glob("images_*/images/*.png")}
    x = normalize_batch(torch.from_numpy(np.stack([load_image(str(paths[r["Image Index"]])).pixels for r in rows])))
    y = torch.tensor([[float(f in r["Finding Labels"].split("|")) for f in CHEXNET_FINDINGS] for r in rows])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
