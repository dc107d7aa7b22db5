"""A full-size rehearsal of the nightly: an NIH-layout root of N rows, the job run as a user runs it.

``layout`` writes ROOT/Data_Entry_2017_v2020.csv with the first rows of the real metadata and, for
each row, a hard link to one of the real films (cycling over them) under ROOT/images_001..012/images/
(as the twelve archives unpack). ``rehearse`` then runs, each as its own process tree: the first run
(tiny CAM network), a no-op rerun, a rerun after 1% more rows, the job on those added rows alone (a
fresh --out: the baseline of the +1% goal), a rerun after a model update, ``jobs.runs --check``,
``jobs.report``, a DuckDB query (the short steps three times each, their median kept) and the
configuration mistakes issue 23 lists, each against the full-size root; per step it measures the
wall time, the peak RSS of the driver, of the largest worker and of the decode processes together,
the peak use of /dev/shm, and the outputs' sizes. ``goals`` reads issue 23's goals off those
figures. ``python -m jobs.benchmark --full-size [N]`` prints the table and the goals.
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
    root, lines, films = plan["root"], plan["lines"], plan["films"]
    start = plan["linked"]
    for i in range(start, upto):
        target = film_path(plan, i)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(films[i % len(films)], target)
            except OSError:
                shutil.copyfile(films[i % len(films)], target)
    with open(root / METADATA, "a") as f:
        f.write("".join(x + "\n" for x in lines[start:upto]))
    plan["linked"] = upto
    return upto - start


def film_path(plan: dict, i: int) -> Path:
    """Where row i's film lies: the rows spread over images_001..012 in order, as the archives unpack."""
    name = plan["lines"][i].split(",", 1)[0]
    return plan["root"] / f"images_{1 + i * FOLDERS // plan['total']:03d}" / "images" / name


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
    aggregates_s: float | None = None  # aggregates + probes, from the _aggregates.json the step wrote
    score_s: float | None = None  # the scoring phase (run.json's score_wall) of a run the step finished
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


def rehearse(n: int, shared_nih: Path, work: Path, repo: Path, identifiability: bool = True, log=print,
             repeats: int = 3) -> tuple[list[Step], dict]:
    """Lay out n rows (+1% more for the incremental step) and run every step; returns the steps and
    the output sizes after the last scoring step. Short steps run ``repeats`` times (their wall time
    is the median). Raises RuntimeError naming a step that failed."""
    extra = max(1, n // 100)
    available = len(_metadata_lines(shared_nih)[1])
    if n + extra > available and n <= available:  # all 112,120 rows: the +1% step brings the dataset to them
        n -= extra
        log(f"the metadata has {available:,} rows: the first run takes {n:,}, the +1% step adds the last {extra:,}")
    root, out = work / "ChestX-ray14", work / "out"
    t = time.perf_counter()
    plan = layout(root, n, shared_nih, grow_to=n + extra)
    log(f"laid out {n:,} rows under {root} in {time.perf_counter() - t:.1f} s (films hard-linked over {len(plan['films'])} real ones)")
    ckpt1, ckpt2 = write_checkpoint(work / "tiny-a.safetensors", 1), write_checkpoint(work / "tiny-b.safetensors", 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    py = sys.executable

    def job(ckpt, data=root, to=out, arch="tiny"):  # arch None: the default, densenet121
        return [py, "-m", "jobs.score_dataset", "--dataset", f"nih:{data}", "--checkpoint", ckpt, "--out", str(to)] + (
            ["--arch", arch] if arch else []) + (["--identifiability"] if identifiability else [])

    steps: list[Step] = []

    def run(name, cmd, note="", times=1, expect=0):
        log(f"step: {name} ...")
        since = time.time()
        runs = [measure(name, cmd, work, env) for _ in range(times)]
        s = _median_step(runs)
        s.note = "; ".join(x for x in (note, s.note, aggregates_note(out, since) if expect == 0 else "") if x)
        s.aggregates_s = aggregates_seconds(out, since) if expect == 0 else None
        s.score_s = scoring_seconds(out, since) if expect == 0 else None
        steps.append(s)
        log(f"  {s.wall:.1f} s, rc {s.rc}")
        if s.rc != expect:
            raise RuntimeError(f"step {name!r} exited {s.rc}, not {expect}:\n{s.stdout[-2000:]}\n{s.stderr[-4000:]}")
        return s

    run("first run", job(ckpt1), f"{n:,} films")
    noop = run("no-op rerun", job(ckpt1), times=repeats)
    if not noop.stdout.startswith("nothing changed"):
        noop.note = "NOT a no-op: " + noop.stdout.splitlines()[0][:80] if noop.stdout else "NOT a no-op"
    grow(plan, n + extra)
    run("+1% films", job(ckpt1), f"+{extra:,} films")
    alone = added_only(plan, n, work / "added-only")
    run("the added films alone", job(ckpt1, alone, work / "added-only-out"), f"{extra:,} films, a fresh --out: the +1% goal's baseline")
    run("model update", job(ckpt2), "new weights: new run, cache hits")
    sizes = output_sizes(out)
    run("no-op after the update", job(ckpt2), times=repeats)
    run("jobs.runs --check", [py, "-m", "jobs.runs", "--out", str(out), "--check"], times=repeats)
    run("jobs.report", [py, "-m", "jobs.report", "--out", str(out)], times=repeats)
    run("DuckDB query", [py, "-c", DUCKDB_QUERY, str(out)], times=repeats)
    for name, cmd in mistakes(work, root, ckpt1, job):
        before = _listing(work)
        s = run(f"mistake: {name}", cmd, expect=2)
        written = sorted(_listing(work) - before)
        s.note = "; ".join(x for x in (s.stderr.strip().splitlines()[0][:100] if s.stderr.strip() else "",
                                       f"WROTE {written[:3]}" if written else "nothing written") if x)
    return steps, sizes


def _median_step(runs: list[Step]) -> Step:
    """One row for repeated runs: the median wall time (its run's output), the peaks over all."""
    import statistics

    if len(runs) == 1:
        return runs[0]
    mid = sorted(runs, key=lambda r: r.wall)[len(runs) // 2]
    walls = ", ".join(f"{r.wall:.2f}" for r in runs)
    return Step(mid.name, statistics.median(r.wall for r in runs), max(r.rc for r in runs),
                max(r.driver_rss for r in runs), max(r.worker_rss for r in runs), max(r.decode_rss for r in runs),
                max(r.shm for r in runs), note=f"median of {len(runs)} ({walls} s)", stdout=mid.stdout, stderr=mid.stderr)


def added_only(plan: dict, n: int, root: Path) -> Path:
    """An NIH root of only the rows past n (the +1%), hard links to the same films: the job run on
    them alone is the +1% goal's baseline (3 x (that + 5 s))."""
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = range(n, plan["linked"])
    (root / METADATA).write_text(plan["header"] + "\n" + "".join(plan["lines"][i] + "\n" for i in rows))
    for i in rows:
        src = film_path(plan, i)
        if not (folder / src.name).exists():
            os.link(src, folder / src.name)
    return root


def mistakes(work: Path, root: Path, tiny_ckpt: str, job) -> list[tuple[str, list[str]]]:
    """The configuration mistakes issue 23 lists, each against the full-size root: a checkpoint of
    another architecture (an ImageNet DenseNet-121, a ResNet-18 with 14 outputs, the tiny net as
    DenseNet-121), a pickled whole model, a manifest without a path column, ``nih:ROOT/images``."""
    import torch
    from torchvision.models import densenet121, resnet18

    from pipeline.inference.checkpoint import save_safetensors
    from pipeline.inference.tiny_net import TinyCAMNet

    bad = work / "mistakes"
    bad.mkdir(exist_ok=True)
    save_safetensors(densenet121(weights=None).state_dict(), str(bad / "imagenet.safetensors"))
    torch.save(resnet18(weights=None, num_classes=14).state_dict(), bad / "resnet18.pt")
    torch.save(TinyCAMNet(14), bad / "whole.pt")
    film = next(root.glob("images_*/images/*.png"))
    (bad / "films.csv").write_text(f"image_id,file\n{film.name},{film}\n")
    out = str(work / "mistake-out")

    def dense(ckpt):
        return job(ckpt, to=out, arch=None)

    def dataset(spec):  # job() takes nih: roots; another adapter is swapped in
        cmd = job(tiny_ckpt, to=out)
        return cmd[:cmd.index("--dataset") + 1] + [spec] + cmd[cmd.index("--dataset") + 2:]

    return [("ImageNet DenseNet-121", dense(str(bad / "imagenet.safetensors"))),
            ("ResNet-18 with 14 outputs", dense(str(bad / "resnet18.pt"))),
            ("the tiny net as DenseNet-121", dense(tiny_ckpt)),
            ("pickled whole model", dense(str(bad / "whole.pt"))),
            ("manifest without a path column", dataset(f"manifest:{bad / 'films.csv'}")),
            ("nih: at ROOT/images_001/images", job(tiny_ckpt, root / "images_001" / "images", out))]


def _listing(work: Path) -> set[str]:
    """What exists under work, the mistakes' own inputs, the films and the Zarr stores' insides
    aside (224k cache files at full size; a refused run stops before any store is opened)."""
    seen = set()
    for folder, dirs, files in os.walk(work):
        dirs[:] = [d for d in dirs if not (d.endswith(".zarr") or d in ("cache", "mistakes", "ChestX-ray14"))]
        seen.update(os.path.relpath(os.path.join(folder, x), work) for x in dirs + files)
    return seen


def written_since(out: Path, name: str, since: float) -> dict | None:
    """The runs/*/NAME a step wrote (modified since ``since``); None when none or several were."""
    import json

    written = [p for p in out.glob(f"runs/*/{name}") if p.stat().st_mtime >= since]
    return json.loads(written[0].read_text()) if len(written) == 1 else None


def aggregates_seconds(out: Path, since: float) -> float | None:
    """Aggregates + probes of the _aggregates.json the step wrote (None: none written)."""
    rec = written_since(out, "_aggregates.json", since)
    return None if rec is None else sum((rec.get("seconds") or {}).values())


def scoring_seconds(out: Path, since: float) -> float | None:
    """The scoring phase (``score_wall``) of the run whose run.json the step wrote."""
    rec = written_since(out, "run.json", since)
    return None if rec is None else (rec.get("seconds") or {}).get("score_wall")


GOALS = {"no-op": 5.0, "report": 30.0, "aggregates": 300.0, "driver_mb": 2048.0, "mistake": 2.0}  # issue 23


def goals(steps: list[Step]) -> list[str]:
    """Issue 23's goals against this rehearsal's own figures, one line each, met or NOT met."""
    by = {s.name: s for s in steps}

    def line(ok: bool, text: str) -> str:
        return f"{'met' if ok else 'NOT met'}: {text}"

    out = []
    for name in ("no-op rerun", "no-op after the update"):
        if name in by:
            out.append(line(by[name].wall <= GOALS["no-op"], f"{name} {by[name].wall:.2f} s (goal <= {GOALS['no-op']:.0f} s)"))
    if "+1% films" in by and "the added films alone" in by:
        bound = 3 * (by["the added films alone"].wall + 5)
        out.append(line(by["+1% films"].wall <= bound, f"+1% films {by['+1% films'].wall:.1f} s (goal <= 3 x (the added films alone "
                                                     f"{by['the added films alone'].wall:.1f} s + 5 s) = {bound:.1f} s)"))
    if "+1% films" in by and by["+1% films"].score_s is not None:  # the stricter reading: its own scoring phase
        plus, strict = by["+1% films"], 3 * (by["+1% films"].score_s + 5)
        out.append(line(plus.wall <= strict, f"+1% films {plus.wall:.1f} s against its own scoring phase (stricter: 3 x "
                                             f"({plus.score_s:.1f} s + 5 s) = {strict:.1f} s)"))
    peak = max(steps, key=lambda s: s.driver_rss)
    out.append(line(peak.driver_rss <= GOALS["driver_mb"], f"driver peak RSS {peak.driver_rss:.0f} MB in '{peak.name}' (goal <= 2 GB)"))
    if "jobs.report" in by:
        out.append(line(by["jobs.report"].wall <= GOALS["report"], f"report {by['jobs.report'].wall:.1f} s (goal <= 30 s)"))
    agg = [(s.aggregates_s, s.name) for s in steps if s.aggregates_s is not None]
    if agg:
        worst = max(agg)
        out.append(line(worst[0] <= GOALS["aggregates"], f"aggregates + probes at most {worst[0]:.1f} s, in '{worst[1]}' (goal <= 5 min)"))
    wrong = [s for s in steps if s.name.startswith("mistake: ")]
    if wrong:
        slow = max(wrong, key=lambda s: s.wall)
        ok = all(s.rc == 2 and s.wall <= GOALS["mistake"] and "WROTE" not in s.note for s in wrong)
        out.append(line(ok, f"{len(wrong)} configuration mistakes refused with exit 2, nothing written, slowest {slow.wall:.2f} s "
                            f"('{slow.name[9:]}'; goal <= 2 s)"))
    return out


def aggregates_note(out: Path, since: float) -> str:
    """What the step's aggregation cost, from the _aggregates.json it wrote (none: '')."""
    rec = written_since(out, "_aggregates.json", since)
    if rec is None:
        return ""
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
