"""`jobs.runs --check`: every run's shards against their records, and the bookkeeping files,
without writing anything."""

from __future__ import annotations

from pipeline.core.redact import redact
from pipeline.store.bookkeeping import previous_manifest
from pipeline.inference.images import PreprocessConfig
from pipeline.inference.model_spec import ModelSpec
from pipeline.worker.runspec import RunSpec
from pipeline.worker.cache import changed_sources
from pipeline.store.shard_check import check_shard, chunk_layout
from pipeline.worker.shards import plan_shards
from pipeline.store.layout import LATEST, LOCK, OutputStore
from pipeline.store.run_index import read_run
from pipeline.io.location import InputOptions, Location


def check_out(out, verify: bool = False, storage_options: dict | None = None, inputs: InputOptions | None = None) -> list[str]:
    """Problems of every run under out. ``inputs``: the options --verify reads the films with
    (--input-option; never --out's storage options)."""
    store = OutputStore.of(out, storage_options)
    inputs = inputs or InputOptions()
    problems = []
    for name, url in ((LATEST, store.latest), (LOCK, store.lock)):
        _, why = store.read_json_safe(url)
        if why:
            problems.append(f"{name}: unreadable ({why}); the next run rebuilds it" if name == LATEST
                            else f"{name}: unreadable ({why}); python -m jobs.runs --out {store.url} --unlock")
    manifest, why = previous_manifest(store)
    if why:
        problems.append(f"manifest.parquet: unreadable ({why}); the next run rebuilds it from the datasets")
    cache_roots = {store.cache_root}
    for mv in store.model_versions():
        run, why = read_run(store, mv)
        if run is None:
            problems.append(f"runs/{mv}/run.json: unreadable ({why}); the next run into it rebuilds it")
            continue
        if run.resolved and run.resolved.get("cache"):
            cache_roots.add(run.resolved["cache"])
        if manifest is None:
            continue
        ident, cfg = run.identity, run.config
        try:
            spec = RunSpec(out=store.url, model=ModelSpec(cfg.get("arch", ""), cfg.get("checkpoint", ""), tuple(ident["findings"])),
                           model_version=mv, baselines=tuple(ident["baselines"]), preprocess=PreprocessConfig(**ident["preprocess"]),
                           shard_size=int(ident["shard_size"]), storage_options=store.storage_options, inputs=inputs)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"runs/{mv}/run.json: no usable identity ({type(e).__name__})")
            continue
        n_rows = int(max(manifest.column("row").to_pylist(), default=-1)) + 1
        try:
            layout = chunk_layout(spec.maps_url, dict(store.storage_options))  # read once for every shard
        except Exception:  # noqa: BLE001 - each shard's check reports an unreadable maps.zarr
            layout = None
        for s in plan_shards(manifest, spec.shard_size, n_rows, cfg.get("limit")):
            st = check_shard(s, spec, verify=verify, layout=layout, sources_check=changed_sources)
            if st.state == "damaged":
                problems.append(f"runs/{mv} shard {s.index}: {'; '.join(st.problems)} (a rerun rescores it)")
    if verify:
        problems += check_caches(sorted(cache_roots), store.root)
    return problems


def check_caches(roots, storage_options: "dict | Location | None" = None) -> list[str]:
    """Every entry of every cache group under ``roots`` against its pixel digest. ``storage_options``:
    the output's (a dict, or the output root's Location)."""
    from pipeline.worker.cache import verify_cache
    from pipeline.io.fs import join
    from pipeline.store.storage import kwargs_of, resolve

    problems = []
    for root in roots:
        try:
            fs, path = resolve(root, storage_options)
            groups = sorted(p for p in fs.ls(path, detail=False) if fs.isdir(p)) if fs.isdir(path) else []
        except OSError:
            continue
        for g in groups:
            name = g.rstrip("/").rsplit("/", 1)[-1]
            try:
                bad = verify_cache(join(root, name), kwargs_of(storage_options))
            except Exception as e:  # noqa: BLE001 - an unreadable group is damage too
                bad = [f"unreadable ({type(e).__name__}); delete it or pass --cache none"]
            problems += [f"cache {redact(join(root, name))} {b}" for b in bad]
    return problems
