"""Max |difference| of each --precision against the float64 reference on real films (the README's table).

    python docs/measure_precision.py [--films 30] [--device cpu|cuda] [--batch 5]

Seeded random DenseNet-121 (``random:11``, ``--seed``), the first N films of ``$CXR_AUDIT_SHARED/data/nih/images``
(default ``../shared``), the same float64 reference as ``tests/inference/test_precision.py``; films
go through in batches so the float64 forward stays within a few GB.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test's reference: one definition of it

import tests.conftest  # noqa: E402, F401 (first, as under pytest: it sets OpenMP up before torch loads)
from tests.inference.test_precision import float64_reference  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.core.findings import CHEXNET_FINDINGS, REFERENCE_BASELINES  # noqa: E402
from pipeline.inference.cam import infer_batch  # noqa: E402
from pipeline.inference.images import load_image  # noqa: E402
from pipeline.inference.model import ModelSpec, load_model  # noqa: E402
from pipeline.inference.precision import PRECISIONS  # noqa: E402

BASE = tuple(REFERENCE_BASELINES[f] for f in CHEXNET_FINDINGS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--films", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=5)
    p.add_argument("--seed", type=int, default=11, help="random:SEED weights (the test's: 11)")
    a = p.parse_args()
    shared = Path(os.environ.get("CXR_AUDIT_SHARED") or ROOT.parent / "shared")
    paths = sorted(glob.glob(str(shared / "data" / "nih" / "images" / "*.png")))[: a.films]
    spec = ModelSpec("densenet121", f"random:{a.seed}")
    reference_model = load_model(spec)  # stays on the CPU
    on_device = load_model(spec).to(torch.device(a.device))
    worst = {prec: [0.0, 0.0] for prec in PRECISIONS}
    for i in range(0, len(paths), a.batch):
        batch = paths[i: i + a.batch]
        ref_prob, ref_cam = float64_reference(reference_model, batch)
        pixels = np.stack([load_image(path).pixels for path in batch])
        for prec in PRECISIONS:
            out = infer_batch(on_device, pixels, BASE, precision=prec)
            worst[prec][0] = max(worst[prec][0], float(np.abs(out.prob - ref_prob).max()))
            worst[prec][1] = max(worst[prec][1], float(np.abs(out.cam - ref_cam).max()))
    print(f"{len(paths)} films, {a.device}, DenseNet-121 random:{a.seed}; max |difference| against float64")
    for prec, (err_p, err_m) in worst.items():
        print(f"  {prec:5s} probability {err_p:.1e}  map {err_m:.1e}")


if __name__ == "__main__":
    main()
