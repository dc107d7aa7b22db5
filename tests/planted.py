"""Known answers for the scorecard's verdicts: demo-style films with a marker planted in one grid
cell of every positive film (a shortcut the location rule must find), and the same films with their
labels permuted (nothing to find). Used by tests/analysis/test_verdicts.py (fast: a few seeds) and by
``python -m tests.planted`` (all seeds, the README's rates)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

FINDING = "Pneumonia"
CELL = (6, 0)  # bottom-left: nothing of the demo's anatomy or markers is there


def plant(root: Path, cell: tuple[int, int] = CELL, finding: str = FINDING, grid: int = 7) -> int:
    """Stamp a bright square into ``cell`` of every film positive for ``finding``; returns how many."""
    with open(root / "Data_Entry_2017_v2020.csv") as f:
        rows = list(csv.DictReader(f))
    paths = {p.name: p for p in root.glob("images_*/images/*.png")}
    n = 0
    for r in rows:
        if finding in r["Finding Labels"].split("|"):
            img = np.asarray(Image.open(paths[r["Image Index"]])).copy()
            c = img.shape[0] // grid
            i, j = cell
            img[i * c + c // 4: i * c + 3 * c // 4, j * c + c // 4: j * c + 3 * c // 4] = 250
            Image.fromarray(img).save(paths[r["Image Index"]])
            n += 1
    return n


def permute_labels(root: Path, seed: int) -> None:
    """Shuffle the Finding Labels column across films: a model then has nothing to find."""
    with open(root / "Data_Entry_2017_v2020.csv") as f:
        reader = csv.reader(f)
        header, rows = next(reader), list(reader)
    labels = [r[1] for r in rows]
    perm = np.random.default_rng(seed).permutation(len(rows))
    for r, k in zip(rows, perm):
        r[1] = labels[k]
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def scorecard_of(base: Path, seed: int, planted: bool, n: int = 256, size: int = 128, epochs: int = 10):
    """Make, train, score and aggregate one dataset; returns its scorecard (a DataFrame)."""
    import pandas as pd

    from jobs.score_dataset import main as score_main
    from pipeline.demo import make_demo_dataset, make_demo_model

    root = make_demo_dataset(base / "data", n=n, size=size, seed=seed)
    if planted:
        plant(root)
    else:
        permute_labels(root, seed)
    ckpt = make_demo_model(base / "model.safetensors", data_root=root, seed=seed, epochs=epochs)
    out = base / "out"
    code = score_main(["--dataset", f"nih:{root}", "--checkpoint", ckpt, "--arch", "pipeline.inference.tiny_net:tiny_cam_net",
                       "--out", str(out), "--cluster", "inprocess", "--no-report", "--cache", "none", "-q"])
    assert code == 0
    run = next((out / "runs").iterdir())
    return pd.read_parquet(run / "scorecard.parquet")


def main(argv: list[str] | None = None) -> int:
    """python -m tests.planted [SEEDS]: marks on planted and permuted datasets, seed by seed."""
    import tempfile

    seeds = int((argv or sys.argv[1:] or ["20"])[0])
    found = falsely = clean = 0
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as tmp:
            card = scorecard_of(Path(tmp) / "planted", seed, True)
            hit = bool(card[(card.finding == FINDING) & (card.rule == "location")].mark.any())
            perm = scorecard_of(Path(tmp) / "permuted", seed, False)
            k = int(perm.mark.sum())
        found += hit
        falsely += k
        clean += k == 0
        print(f"seed {seed}: planted marked by location {hit}; permuted labels: {k} marks", flush=True)
    print(f"planted shortcut found in {found} of {seeds}; permuted: {falsely} marks in all, {clean} of {seeds} seeds with none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
