"""Benchmark: images/s of the job against the baselines a user would write, same images, same model.

(a) this job on the local cluster; (b) a plain single-process batched torch loop doing the same work
(decode, forward, maps); (c) the reference's way (one forward per image, the map by explicit loops,
once per finding); (d) decode-only and forward-only ceilings. Prints medians and ratios.

    python -m jobs.benchmark                      # 120 real films from ../shared, DenseNet-121
    python -m jobs.benchmark --arch tiny --images 64 --repeats 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.demo import make_demo_dataset
from pipeline.findings import CHEXNET_FINDINGS, REFERENCE_BASELINES
from pipeline.images import load_image, normalize_batch, reference_transform
from pipeline.model import ModelSpec, build_arch, load_model
from pipeline.reference import reference_image

ARCHS = {"densenet121": "densenet121", "tiny": "pipeline.tiny_net:tiny_cam_net"}
BASE = tuple(REFERENCE_BASELINES[f] for f in CHEXNET_FINDINGS)


def _films(n: int, workdir: Path) -> tuple[str, list[str]]:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih"
    if (shared / "images").exists():
        return f"nih:{shared}", sorted(glob.glob(str(shared / "images" / "*.png")))[:n]
    root = make_demo_dataset(workdir / "synthetic", n=n, size=1024, seed=0)
    return f"nih:{root}", sorted(glob.glob(str(root / "images_*" / "images" / "*.png")))[:n]


def _median_rate(fn, n_images: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def plain_loop(net, linear, paths, batch_size, channels_last=False):
    """(b): what a user writes by hand: torchvision transforms, batched forward, maps by einsum."""
    tf = reference_transform()
    log_b = torch.log(torch.tensor(BASE))
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            fmap = F.relu(net.features(x))
            _prob = torch.sigmoid(linear(fmap.mean((2, 3))))
            z = torch.einsum("bdhw,fd->bfhw", fmap, linear.weight) + linear.bias.view(1, -1, 1, 1)
            _maps = F.logsigmoid(z) - log_b.view(1, -1, 1, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="densenet121")
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--reference-images", type=int, default=6, help="images for (c), which is slow")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=64)
    from jobs._common import add_common, setup_logging

    args = add_common(p).parse_args(argv)
    setup_logging(args)

    from jobs.score_dataset import run
    from pipeline.scoring import ScoreConfig

    work = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    dataset, paths = _films(args.images, work)
    n = len(paths)
    arch = ARCHS[args.arch]
    model = load_model(ModelSpec(arch, "random:0"))
    net = build_arch(arch, 14)
    net.features, net.classifier = model.features, model.classifier
    net.eval()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; {n} films from {dataset}; arch {args.arch}; "
          f"median of {args.repeats}")

    job_rates, phase_rates = [], []
    for r in range(args.repeats):
        out = work / f"out{r}"
        cfg = ScoreConfig(datasets=(dataset,), out=str(out), checkpoint="random:0", arch=arch, shard_size=args.shard_size,
                          batch_size=args.batch_size, limit=n, device="cpu" if not torch.cuda.is_available() else "auto")
        t = time.perf_counter()
        result = run(cfg)
        wall = time.perf_counter() - t
        assert result["counts"]["scored"] == n, result["counts"]
        job_rates.append(n / wall)
        phase_rates.append(n / result["seconds"]["score_wall"])
        shutil.rmtree(out)
    a_total, a = statistics.median(job_rates), statistics.median(phase_rates)

    # Nightly rerun with a new model: the second run reads the preprocessed cache the first wrote.
    cold_rates, warm_rates, cache_bytes = [], [], 0
    for r in range(args.repeats):
        out = work / f"cache{r}"
        rates = []
        for seed in (10 + 2 * r, 11 + 2 * r):
            cfg = ScoreConfig(datasets=(dataset,), out=str(out), checkpoint=f"random:{seed}", arch=arch, shard_size=args.shard_size,
                              batch_size=args.batch_size, limit=n, device="cpu" if not torch.cuda.is_available() else "auto")
            result = run(cfg)
            rates.append(n / result["seconds"]["score_wall"])
        assert result["counts"]["cache_now"]["hits"] == n, result["counts"]["cache_now"]
        cold_rates.append(rates[0])
        warm_rates.append(rates[1])
        cache_bytes = sum(f.stat().st_size for f in (out / "cache").rglob("*") if f.is_file())
        shutil.rmtree(out)

    b = _median_rate(lambda: plain_loop(net, model.classifier, paths, args.batch_size), n, args.repeats)
    net_cl = build_arch(arch, 14)
    net_cl.load_state_dict(net.state_dict())
    net_cl.eval().to(memory_format=torch.channels_last)
    b_cl = _median_rate(lambda: plain_loop(net_cl, net_cl.classifier, paths, args.batch_size, True), n, args.repeats)
    ref_paths = paths[: args.reference_images]
    c = _median_rate(lambda: [reference_image(net, model.classifier, q, BASE) for q in ref_paths], len(ref_paths), 1)
    decode = _median_rate(lambda: [load_image(q) for q in paths], n, args.repeats)
    pixels = torch.from_numpy(np.stack([load_image(q).pixels for q in paths[: args.batch_size]]))

    def forward_only():
        with torch.inference_mode():
            for _ in range(0, n, args.batch_size):
                net_cl.features(normalize_batch(pixels).contiguous(memory_format=torch.channels_last))

    fwd = _median_rate(forward_only, (n + args.batch_size - 1) // args.batch_size * args.batch_size, args.repeats)
    shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("(a) job, scoring phase (submit to done, incl. worker model load)", a),
        ("(a) job, end to end (manifest, cluster start, writes)", a_total),
        ("(b) plain batched torch loop, one process", b),
        ("(b') the same loop with channels_last (the job's layout)", b_cl),
        ("(c) reference: per image, loops, once per finding", c),
        ("(d) decode + preprocess only, one thread", decode),
        ("(d) forward only (batched, channels_last, preprocessed)", fwd),
    ]
    for name, rate in rows:
        print(f"{name:58s} {rate:8.2f} img/s")
    cold, warm = statistics.median(cold_rates), statistics.median(warm_rates)
    print(f"{'(e) rerun with a new model, cache cold':58s} {cold:8.2f} img/s")
    print(f"{'(e) rerun with a new model, cache warm (no decoding)':58s} {warm:8.2f} img/s")
    print(f"cache speed-up warm/cold = {warm / cold:.2f} (goal >= 1.3);  cache size {cache_bytes / n / 1024:.0f} KiB per image")
    print(f"ratio (a)/(b) = {a / b:.2f}   (goal >= 0.9);  (a)/(b') = {a / b_cl:.2f};  end-to-end/(b) = {a_total / b:.2f}")
    print(f"ratio (a)/(c) = {a / c:.1f}   (goal >= 25);  forward-only ceiling/(c) = {fwd / c:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
