"""A full-size rehearsal of the nightly: an NIH-layout root of N rows, the job run as a user runs it.

``layout`` writes ROOT/Data_Entry_2017_v2020.csv with the first rows of the real metadata and, for
each row, a hard link to one of the real films (cycling over them) under ROOT/images_001..012/images/
(as the twelve archives unpack). ``rehearse`` then runs, each as its own process tree: the first run
(tiny CAM network), a no-op rerun, a rerun after 1% more rows, a rerun after a model update,
``jobs.runs --check``, ``jobs.report`` and a DuckDB query, and measures per step the wall time, the
peak RSS of the driver, of the largest worker and of the decode processes together, the peak use of
/dev/shm, and the outputs' sizes. ``python -m jobs.benchmark --full-size [N]`` prints the table.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FOLDERS = 12  # images_001 .. images_012, as the NIH archives unpack
METADATA = "Data_Entry_2017_v2020.csv"


def _metadata_lines(shared_nih: Path) -> tuple[str, list[str]]:
    src = shared_nih / (METADATA + ".gz")
    opener = gzip.open if src.exists() else open
    with opener(src if src.exists() else shared_nih / METADATA, "rt") as f:
        lines = f.read().splitlines()
    return lines[0], [x for x in lines[1:] if x.strip()]


def layout(root: Path, n: int, shared_nih: Path, grow_to: int | None = None) -> dict:
    """The first n rows of the real metadata as an NIH root, films hard-linked (copied when the
    file system refuses links). With grow_to, rows n..grow_to are kept aside for ``grow``."""
    header, lines = _metadata_lines(shared_nih)
    total = grow_to or n
    if total > len(lines):
        raise ValueError(f"{total} rows asked for; the metadata has {len(lines)}")
    films = sorted((shared_nih / "images").glob("*.png"))
    if not films:
        raise FileNotFoundError(f"no films under {shared_nih / 'images'}")
    root.mkdir(parents=True, exist_ok=True)
    (root / METADATA).write_text(header + "\n")
    plan = {"root": root, "header": header, "lines": lines[:total], "films": films, "total": total, "linked": 0}
    grow(plan, n)
    return plan


def grow(plan: dict, upto: int) -> int:
    """Link the films of rows [linked, upto) and append their metadata lines; returns rows added."""
    root, lines, films, total = plan["root"], plan["lines"], plan["films"], plan["total"]
    start = plan["linked"]
    for i in range(start, upto):
        name = lines[i].split(",", 1)[0]
        folder = root / f"images_{1 + i * FOLDERS // total:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        if not target.exists():
            try:
                os.link(films[i % len(films)], target)
            except OSError:
                shutil.copyfile(films[i % len(films)], target)
    with open(root / METADATA, "a") as f:
        f.write("".join(x + "\n" for x in lines[start:upto]))
    plan["linked"] = upto
    return upto - start


@dataclass
class Step:
    name: str
    wall: float
    rc: int
    driver_rss: float = 0.0  # peak, MB
    worker_rss: float = 0.0  # peak of the largest worker process, MB
    decode_rss: float = 0.0  # peak of all decode processes together, MB
    shm: float = 0.0  # peak /dev/shm use above the step's start, MB
    note: str = ""
    stdout: str = field(default="", repr=False)
    stderr: str = field(default="", repr=False)


def measure(name: str, cmd: list[str], cwd: Path, env: dict | None = None, interval: float = 0.1) -> Step:
    """Run cmd as its own process tree, sampling RSS by process class and /dev/shm."""
    import psutil

    def shm_used() -> float:
        try:
            return shutil.disk_usage("/dev/shm").used / 2**20
        except OSError:
            return 0.0

    shm0 = shm_used()
    peak = {"driver": 0.0, "worker": 0.0, "decode": 0.0, "shm": 0.0}
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = psutil.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env)
        while proc.poll() is None:
            try:
                tree = [proc] + proc.children(recursive=True)
            except psutil.Error:
                tree = [proc]
            decode = 0.0
            for p in tree:
                try:
                    rss = p.memory_info().rss / 2**20
                    line = " ".join(p.cmdline()) if p.pid != proc.pid else ""
                except psutil.Error:
                    continue
                if p.pid == proc.pid:
                    peak["driver"] = max(peak["driver"], rss)
                elif "forkserver" in line or "decode" in line:
                    decode += rss
                elif "spawn_main" in line or "distributed" in line:
                    peak["worker"] = max(peak["worker"], rss)
            peak["decode"] = max(peak["decode"], decode)
            peak["shm"] = max(peak["shm"], shm_used() - shm0)
            time.sleep(interval)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        return Step(name, wall, proc.returncode, peak["driver"], peak["worker"], peak["decode"], peak["shm"],
                    stdout=out.read().decode(errors="replace"), stderr=err.read().decode(errors="replace"))


def tree_mb(path: Path) -> float:
    if not path.exists():
        return 0.0
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def output_sizes(out: Path) -> dict[str, float]:
    """MB on disk: predictions, each maps.zarr array, the cache, everything (latest run)."""
    import json

    latest = json.loads((out / "latest.json").read_text())["model_version"]
    run = out / "runs" / latest
    sizes = {"predictions": tree_mb(run / "predictions")}
    maps = run / "maps.zarr"
    for arr in sorted(p for p in maps.iterdir() if p.is_dir()) if maps.exists() else []:
        sizes[f"maps.zarr/{arr.name}"] = tree_mb(arr)
    sizes["cache"] = tree_mb(out / "cache")
    sizes["all outputs"] = tree_mb(out)
    return sizes


def write_checkpoint(path: Path, seed: int) -> str:
    import torch

    from pipeline.core.findings import CHEXNET_FINDINGS
    from pipeline.inference.checkpoint import save_safetensors
    from pipeline.inference.tiny_net import TinyCAMNet

    torch.manual_seed(seed)
    save_safetensors(TinyCAMNet(len(CHEXNET_FINDINGS)).state_dict(), str(path))
    return str(path)


DUCKDB_QUERY = """
import duckdb, json, sys
out = sys.argv[1]
mv = json.load(open(f"{out}/latest.json"))["model_version"]
rows = duckdb.sql(f\"\"\"SELECT m.view_position, count(*) AS n, avg(p.Pneumonia) AS mean_p
    FROM read_parquet('{out}/runs/{mv}/predictions/*.parquet') p JOIN read_parquet('{out}/manifest.parquet') m USING (row)
    GROUP BY 1 ORDER BY 1\"\"\").fetchall()
print(sum(r[1] for r in rows), rows)
"""


def rehearse(n: int, shared_nih: Path, work: Path, repo: Path, identifiability: bool = True, log=print) -> tuple[list[Step], dict]:
    """Lay out n rows (+1% more for the incremental step) and run every step; returns the steps and
    the output sizes after the last scoring step. Raises RuntimeError naming a step that failed."""
    extra = max(1, n // 100)
    root, out = work / "ChestX-ray14", work / "out"
    t = time.perf_counter()
    plan = layout(root, n, shared_nih, grow_to=n + extra)
    log(f"laid out {n:,} rows under {root} in {time.perf_counter() - t:.1f} s (films hard-linked over {len(plan['films'])} real ones)")
    ckpt1, ckpt2 = write_checkpoint(work / "tiny-a.safetensors", 1), write_checkpoint(work / "tiny-b.safetensors", 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    py = sys.executable

    def job(ckpt):
        return [py, "-m", "jobs.score_dataset", "--dataset", f"nih:{root}", "--checkpoint", ckpt, "--arch", "tiny",
                "--out", str(out)] + (["--identifiability"] if identifiability else [])

    steps: list[Step] = []
    sizes: dict = {}

    def run(name, cmd, note=""):
        log(f"step: {name} ...")
        since = time.time()
        s = measure(name, cmd, work, env)
        s.note = "; ".join(x for x in (note, aggregates_note(out, since)) if x)
        steps.append(s)
        log(f"  {s.wall:.1f} s, rc {s.rc}")
        if s.rc != 0:
            raise RuntimeError(f"step {name!r} failed (exit {s.rc}):\n{s.stdout[-2000:]}\n{s.stderr[-4000:]}")
        return s

    run("first run", job(ckpt1), f"{n:,} films")
    sizes = output_sizes(out)
    noop = run("no-op rerun", job(ckpt1))
    if not noop.stdout.startswith("nothing changed"):
        noop.note = "NOT a no-op: " + noop.stdout.splitlines()[0][:80] if noop.stdout else "NOT a no-op"
    grow(plan, n + extra)
    run("+1% films", job(ckpt1), f"+{extra:,} films")
    run("model update", job(ckpt2), "new weights: new run, cache hits")
    sizes = output_sizes(out)
    run("no-op after the update", job(ckpt2))
    run("jobs.runs --check", [py, "-m", "jobs.runs", "--out", str(out), "--check"])
    run("jobs.report", [py, "-m", "jobs.report", "--out", str(out)])
    run("DuckDB query", [py, "-c", DUCKDB_QUERY, str(out)])
    return steps, sizes


def aggregates_note(out: Path, since: float) -> str:
    """What the step's aggregation cost, from the _aggregates.json it wrote (none: '')."""
    import json

    written = [p for p in out.glob("runs/*/_aggregates.json") if p.stat().st_mtime >= since]
    if not written:
        return ""
    rec = json.loads(written[0].read_text())
    sec, region, probes = rec.get("seconds") or {}, rec.get("region_partials") or {}, rec.get("probes") or {}
    total = sum(sec.values())
    from pipeline.analysis.aggregate import reuse_line

    parts = [f"aggregates + probes {total:.1f} s: region statistics {sec.get('region_statistics', 0):.1f} s ({reuse_line(region)})"]
    if "probes" in sec:
        kept = probes.get("kept")
        parts.append(f"probes {sec['probes']:.1f} s ({'kept, ' + str(kept['changed_since_fit']) + ' films changed since the fit' if kept else 'fitted'})")
    parts.append(f"tables {sec.get('tables', 0):.1f} s, verdicts {sec.get('verdicts', 0):.1f} s")
    return ", ".join(parts)


def table(steps: list[Step], sizes: dict) -> str:
    lines = ["| step | wall (s) | driver peak RSS (MB) | largest worker peak RSS (MB) | decode processes peak RSS (MB) | /dev/shm peak (MB) | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in steps:
        lines.append(f"| {s.name} | {s.wall:.1f} | {s.driver_rss:.0f} | {s.worker_rss:.0f} | {s.decode_rss:.0f} | {s.shm:.0f} | {s.note} |")
    lines += ["", "| output | MB |", "| --- | ---: |"] + [f"| {k} | {v:.2f} |" for k, v in sizes.items()]
    return "\n".join(lines)
