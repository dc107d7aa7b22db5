"""Benchmark: the aggregates of a full-NIH-sized run (112,120 images x 14 findings x 49 cells) on
this machine. Writes synthetic outputs of the real sizes, then times ``jobs.aggregate`` in a child
process and reports its wall time and peak memory (goal: <= 2 min and <= 4 GB on 2 cores).

    python -m jobs.benchmark_aggregates [--images 112120] [--repeats 3]
    python -m jobs.benchmark_aggregates --cell-probes [--baseline-cells 2]

``--cell-probes`` times only the per-cell identifiability probes on one cell sample of the
production size (4,000 images x 49 cells x 1,024 features, the synthetic rows of the full benchmark),
the shared-Gram ridge against the previous per-fold logistic fits on a few cells, in this process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from pipeline.core.findings import CHEXNET_FINDINGS
from pipeline.store.maps_store import create_maps
from pipeline.store.layout import OutputStore
from pipeline.store.run_index import write_run
from schemas.manifest import manifest_schema
from schemas.outputs import predictions_schema
from schemas.records import RunRecord


def make_synthetic_run(out: str, n: int, shard: int = 1024, seed: int = 0, film_paths: list[str] | None = None) -> str:
    rng = np.random.default_rng(seed)
    F = len(CHEXNET_FINDINGS)
    mv = "synthetic0000000"
    cols = {
        "row": np.arange(n), "image_id": [f"{i:08d}_000.png" for i in range(n)], "dataset": ["nih"] * n,
        "site": rng.choice(["nih", "hospB", "hospC"], n), "path": [film_paths[i % len(film_paths)] if film_paths else f"/nowhere/{i}.png" for i in range(n)],
        "patient_id": (np.arange(n) // 4).astype(str), "view_position": rng.choice(["AP", "PA"], n, p=[0.4, 0.6]),
        "sex": rng.choice(["M", "F"], n), "age": rng.integers(1, 95, n).astype(np.int16),
        "split": rng.choice(["train_val", "test"], n, p=[0.8, 0.2]), "extra": [None] * n,
    }
    prev = rng.uniform(0.01, 0.2, F)
    labels = rng.random((n, F)) < prev
    for k, f in enumerate(CHEXNET_FINDINGS):
        cols[f] = labels[:, k]
    store = OutputStore(out)
    store.write_parquet(store.manifest, pa.Table.from_pydict(cols, schema=manifest_schema(CHEXNET_FINDINGS)))
    bias = rng.normal(-3, 0.5, F)
    g = create_maps(store.maps(mv), n, shard, CHEXNET_FINDINGS, (7, 7), 1024,
                    {"baselines": dict(zip(CHEXNET_FINDINGS, prev.tolist())), "model_version": mv, "classifier_bias": bias.tolist()})
    pool = np.maximum(rng.normal(0, 1, (1024, 49, 1024)), 0).astype(np.float16)
    for k, lo in enumerate(range(0, n, shard)):
        hi = min(lo + shard, n)
        z = (bias[None, :, None, None] + rng.normal(0, 1.5, (hi - lo, F, 7, 7)) + 1.5 * labels[lo:hi, :, None, None]).astype(np.float32)
        g["cell_logit"][lo:hi] = z
        # embeddings and cell features of the real sizes, with a site signal in one corner cell
        site_b = (np.asarray(cols["site"][lo:hi]) == "hospB").astype(np.float32)
        emb = rng.normal(0, 1, (hi - lo, 1024)).astype(np.float32)
        emb[:, :8] += site_b[:, None]
        g["embedding"][lo:hi] = emb.astype(np.float16)
        # cell features at the stored width (49 x 1024, ReLU-like): rows drawn from a fixed pool, so that
        # 112k x 49 x 1024 values need not each be generated (the probes read a 4,000-image sample)
        cf = pool[rng.integers(0, len(pool), hi - lo)]
        cf[:, 0, :4] += (2 * site_b[:, None]).astype(np.float16)
        g["cell_features"][lo:hi] = cf
        g["cam"][lo:hi] = (-np.logaddexp(0, -z) - np.log(prev)[None, :, None, None]).astype(np.float32)
        p = 1 / (1 + np.exp(-z.mean(axis=(2, 3))))
        pc = {"row": np.arange(lo, hi), "image_id": cols["image_id"][lo:hi], "model_version": [mv] * (hi - lo)}
        pc.update({f: p[:, j].astype(np.float32) for j, f in enumerate(CHEXNET_FINDINGS)})
        store.write_parquet(store.part(mv, k), pa.Table.from_pydict(pc, schema=predictions_schema(CHEXNET_FINDINGS, mv)))
    write_run(store, RunRecord(model_version=mv, status="complete", finished="now", config={"datasets": ["manifest:synthetic"]}))
    return mv


def cell_probe_sample(n: int = 4_000, seed: int = 0):
    """A manifest and (n, 49, 1024) float16 cell features drawn as make_synthetic_run draws them."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    pool = np.maximum(rng.normal(0, 1, (1024, 49, 1024)), 0).astype(np.float16)
    site = rng.choice(["nih", "hospB", "hospC"], n)
    x = pool[rng.integers(0, len(pool), n)]
    x[:, 0, :4] += (2 * (site == "hospB")[:, None]).astype(np.float16)
    m = pd.DataFrame({"row": np.arange(n), "image_id": [f"{i:08d}_000.png" for i in range(n)], "patient_id": (np.arange(n) // 4).astype(str),
                      "site": site, "view_position": rng.choice(["AP", "PA"], n, p=[0.4, 0.6]), "sex": rng.choice(["M", "F"], n),
                      "age": rng.integers(1, 95, n)})
    return m, x


def bench_cell_probes(baseline_cells: int, repeats: int) -> dict:
    """Seconds for the whole per-cell map (49 cells, every target) with the shared-Gram ridge, and per
    cell for the previous logistic fits (targets of <= 5 classes, as that path ran) on the same sample."""
    from pipeline.analysis.identifiability import ProbeConfig, run_probes

    m, x = cell_probe_sample()
    rows = m.row.to_numpy()
    new, old = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        _, cells, _ = run_probes(m, rows, {}, x, ProbeConfig())
        new.append(time.perf_counter() - t)
        t = time.perf_counter()
        # the previous code: per-fold logistic fits, cells one after the other, BLAS threads as they come
        run_probes(m, rows, {}, x[:, :baseline_cells], ProbeConfig(targets=("site", "view_position", "sex"), cell_probe="logistic"), map_fn=map)
        old.append((time.perf_counter() - t) / baseline_cells)
    ridge_s, logistic_s = statistics.median(new), statistics.median(old)
    return {"ridge_map_s": [round(w, 1) for w in new], "logistic_per_cell_s": [round(w, 1) for w in old],
            "logistic_map_s_estimated": round(49 * logistic_s, 1), "ratio": round(49 * logistic_s / ridge_s, 1),
            "targets_in_ridge_map": sorted({c["target"] for c in cells}), "load_average_1_5_15": [round(v, 1) for v in os.getloadavg()]}


def _films(work: str, n: int = 128, size: int = 1024) -> list[str]:
    """Real 1024x1024 PNGs (demo films, upscaled) for the report's overlays to decode; rows share them."""
    from PIL import Image

    from pipeline.demo import synthetic_film

    rng = np.random.default_rng(1)
    os.makedirs(f"{work}/films", exist_ok=True)
    paths = []
    for i in range(n):
        path = f"{work}/films/{i:04d}.png"
        Image.fromarray(synthetic_film(rng, 256, i % 3 == 0, i % 5 == 0)).resize((size, size), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark_aggregates", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=112_120)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--identifiability", action="store_true", help="time the confounder probes too (issue 4; goal 10 min, 8 GB)")
    p.add_argument("--report", action="store_true", help="then time python -m jobs.report on the result (issue 10; goal 30 s)")
    p.add_argument("--cell-probes", action="store_true", help="time only the per-cell probes: shared-Gram ridge vs the previous logistic fits (issue 14)")
    p.add_argument("--baseline-cells", type=int, default=2, help="with --cell-probes: cells the slow logistic baseline fits (its time is per cell)")
    from jobs._common import add_common, setup_logging

    args = add_common(p).parse_args(argv)
    setup_logging(args)
    if args.cell_probes:
        r = bench_cell_probes(args.baseline_cells, args.repeats)
        print(json.dumps(r))
        print(f"per-cell map of 4,000 images x 49 cells x 1,024 features: ridge {statistics.median(r['ridge_map_s']):.1f} s "
              f"(targets {', '.join(r['targets_in_ridge_map'])}); previous logistic fits {r['logistic_map_s_estimated']:.0f} s "
              f"(49 x the median per cell, without age_band): {r['ratio']}x")
        return 0
    work = tempfile.mkdtemp(prefix="cxr-aggbench-")
    t = time.perf_counter()
    make_synthetic_run(work, args.images, film_paths=_films(work) if args.report else None)
    print(f"synthetic run: {args.images} images x {len(CHEXNET_FINDINGS)} findings x 49 cells, written in {time.perf_counter() - t:.0f} s")
    walls, peaks, cpus = [], [], []
    for _ in range(args.repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        extra = ["--identifiability"] if args.identifiability else []
        subprocess.run([sys.executable, "-m", "jobs.aggregate", "--out", work, *extra], check=True, stdout=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        peaks.append(max(before.ru_maxrss, after.ru_maxrss) / 2**20)  # KiB -> GiB
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)  # on a shared machine: the work, whatever the load
    if args.report:
        report_walls = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "jobs.report", "--out", work], check=True, stdout=subprocess.DEVNULL)
            report_walls.append(time.perf_counter() - t)
        size = sum(os.path.getsize(f) for f in glob.glob(OutputStore(work).report("*")))
        print(f"report of {args.images} images: median {statistics.median(report_walls):.1f} s "
              f"({', '.join(f'{w:.1f}' for w in report_walls)}; goal <= 30 s), {size / 2**20:.2f} MiB")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"wall_s_median": round(statistics.median(walls), 1), "wall_s": [round(w, 1) for w in walls],
                      "peak_rss_gib_max": round(max(peaks), 2), "cpu_s": [round(c, 1) for c in cpus],
                      "load_average_1_5_15": [round(v, 1) for v in os.getloadavg()]}))
    goal_s, goal_gb = (600, 8) if args.identifiability else (120, 4)
    print(f"aggregates{' + identifiability probes' if args.identifiability else ''} of {args.images} images: "
          f"median {statistics.median(walls):.1f} s (goal <= {goal_s} s), peak RSS {max(peaks):.2f} GiB (goal <= {goal_gb})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
