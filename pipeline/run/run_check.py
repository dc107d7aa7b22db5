"""`jobs.runs --check`: every run's shards against their records, and the bookkeeping files,
without writing anything."""

from __future__ import annotations

import posixpath

from pipeline.store.bookkeeping import previous_manifest, read_json_safe
from pipeline.inference.images import PreprocessConfig
from pipeline.inference.model import ModelSpec
from pipeline.run.runspec import RunSpec
from pipeline.store.shard_check import check_shard
from pipeline.run.shards import plan_shards
from pipeline.store.storage import join, url_to_fs


def check_out(out: str, verify: bool = False, storage_options: dict | None = None) -> list[str]:
    so = storage_options or {}
    problems = []
    for name in ("latest.json", "_lock.json"):
        _, why = read_json_safe(join(out, name), so)
        if why:
            problems.append(f"{name}: unreadable ({why}); the next run rebuilds it" if name == "latest.json"
                            else f"{name}: unreadable ({why}); python -m jobs.runs --out {out} --unlock")
    manifest, why = previous_manifest(out, so)
    if why:
        problems.append(f"manifest.parquet: unreadable ({why}); the next run rebuilds it from the datasets")
    fs, base = url_to_fs(join(out, "runs"), so)
    for d in sorted(fs.ls(base, detail=False)) if fs.exists(base) else []:
        mv = posixpath.basename(d)
        run, why = read_json_safe(join(out, "runs", mv, "run.json"), so)
        if why or not isinstance(run, dict):
            problems.append(f"runs/{mv}/run.json: unreadable ({why}); the next run into it rebuilds it")
            continue
        if manifest is None:
            continue
        ident = run.get("identity") or {}
        cfg = run.get("config") or {}
        try:
            spec = RunSpec(out=out.rstrip("/"), model=ModelSpec(cfg.get("arch", ""), cfg.get("checkpoint", ""), tuple(ident["findings"])),
                           model_version=mv, baselines=tuple(ident["baselines"]), preprocess=PreprocessConfig(**ident["preprocess"]),
                           shard_size=int(ident["shard_size"]), storage_options=tuple(sorted(so.items())))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"runs/{mv}/run.json: no usable identity ({type(e).__name__})")
            continue
        n_rows = int(max(manifest.column("row").to_pylist(), default=-1)) + 1
        for s in plan_shards(manifest, spec.shard_size, n_rows, cfg.get("limit")):
            st = check_shard(s, spec, verify=verify)
            if st.state == "damaged":
                problems.append(f"runs/{mv} shard {s.index}: {'; '.join(st.problems)} (a rerun rescores it)")
    return problems
