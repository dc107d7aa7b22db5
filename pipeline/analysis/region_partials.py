"""Per-chunk region statistics kept between runs, so that a rerun merges instead of recomputing.

The region statistics are sums, counts, min/max and histograms (``RegionAccumulator``): the
dataset's are a merge of each maps.zarr chunk's (one chunk per shard). Each chunk's accumulator is
kept under ``OUT/runs/<model_version>/_partials/region-<chunk>.npz``, one entry per stratum value,
each under a digest of everything it was computed from: the chunk's stored bytes (the SHA-256 of
its ``cam`` and ``cell_logit`` chunks, from the shard's record), the classifier bias, the chunk's
rows and that stratum value's row mask. A rerun reads a chunk's maps only when one of its entries
is missing or its digest changed (new films, a rescored shard, a row that moved into or out of the
top-10% confidence stratum), and recomputes only those entries.

Merged in the order a full recompute adds them (chunks folded in row order within the partitions of
``accumulate``, then the same pairwise tree), a merge of kept and new partials is bit-identical to
a recompute from the maps: each entry is the float64 result of the same additions, saved and loaded
without rounding.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath

import numpy as np

from pipeline.analysis.region_stats import CellStats, RegionAccumulator
from pipeline.store.shard_check import DONE_STATUSES
from pipeline.io.fs import url_to_fs
from pipeline.store.storage import write_bytes_atomic

log = logging.getLogger(__name__)

PARTIALS = "_partials"
FORMAT = 1  # bump when what an entry holds or how its digest is made changes: old files are then recomputed
_FIELDS = ("count", "total", "total_sq", "vmin", "vmax", "n_pos", "pos_part", "contrib", "abs_contrib", "dev_sq")


def partials_dir(run_url: str) -> str:
    return posixpath.join(run_url.rstrip("/"), PARTIALS)


def partial_url(partials: str, chunk: int) -> str:
    return posixpath.join(partials, f"region-{chunk:06d}.npz")


def chunk_fingerprint(record: dict | None) -> str | None:
    """What a chunk's maps are, from its shard's record: the stored bytes' hashes of the arrays the
    region statistics read. None (no reuse) when the record does not vouch for them."""
    if not isinstance(record, dict) or record.get("status") not in DONE_STATUSES:
        return None
    chunks = (record.get("outputs") or {}).get("chunks") or {}
    hashes = [(chunks.get(name) or {}).get("sha256") for name in ("cam", "cell_logit")]
    return None if None in hashes else ":".join(hashes)


def entry_digest(fingerprint: str, bias: np.ndarray, rows: np.ndarray, key: tuple[str, str], weight: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, fingerprint, list(key)]).encode())
    for a in (np.ascontiguousarray(bias, np.float64), np.ascontiguousarray(rows, np.int64), np.packbits(np.asarray(weight, bool))):
        h.update(a.tobytes())
    h.update(str(weight.shape).encode())
    return h.hexdigest()[:32]


def load(url: str, storage_options: dict | None = None) -> dict[tuple[str, str], tuple[str, CellStats]]:
    """{key: (digest, statistics)} kept for a chunk; empty when absent or unreadable (then recomputed)."""
    fs, path = url_to_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            z = np.load(io.BytesIO(f.read()), allow_pickle=False)
            index = json.loads(bytes(z["index"]).decode())
            if index.get("format") != FORMAT:
                return {}
            out = {}
            for i, (key, digest, hist_shape) in enumerate(index["entries"]):
                hist = np.zeros(hist_shape, np.int32)
                hist.reshape(-1)[z[f"{i}.hist_at"]] = z[f"{i}.hist_n"]
                out[tuple(key)] = (digest, CellStats(**{k: z[f"{i}.{k}"] for k in _FIELDS}, hist=hist))
            return out
    except FileNotFoundError:
        return {}
    except Exception as e:  # noqa: BLE001 - a damaged partial is only a lost shortcut: recomputed
        log.debug(f"{url}: unreadable partial ({type(e).__name__}: {e}); recomputing it")
        return {}


def save(url: str, entries: dict[tuple[str, str], tuple[str, CellStats]], storage_options: dict | None = None) -> None:
    arrays: dict[str, np.ndarray] = {}
    index = {"format": FORMAT, "entries": []}
    for i, (key, (digest, s)) in enumerate(sorted(entries.items())):
        index["entries"].append([list(key), digest, list(s.hist.shape)])
        for k in _FIELDS:
            arrays[f"{i}.{k}"] = getattr(s, k)
        at = np.flatnonzero(s.hist)  # a chunk fills few of a histogram's bins
        arrays[f"{i}.hist_at"], arrays[f"{i}.hist_n"] = at.astype(np.int64), s.hist.reshape(-1)[at]
    arrays["index"] = np.frombuffer(json.dumps(index).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(url, buf.getvalue(), storage_options)


def chunk_accumulator(wanted: list[tuple[tuple[str, str], np.ndarray]], digests: list[str] | None, url: str | None,
                      compute, n_findings: int, n_cells: int, storage_options: dict | None = None) -> tuple[RegionAccumulator, list[str]]:
    """One chunk's accumulator: kept entries whose digest matches, the others from ``compute(keys)``
    (which reads the chunk's maps). ``digests`` None: nothing kept or saved. Returns it and the
    entries recomputed ('stratum=value')."""
    kept = load(url, storage_options) if digests is not None and url else {}
    acc = RegionAccumulator(n_findings, n_cells)
    todo = []
    for i, (key, _) in enumerate(wanted):
        hit = kept.get(key)
        if digests is not None and hit is not None and hit[0] == digests[i]:
            acc.stats[key] = hit[1]
        else:
            todo.append(i)
    if todo:
        fresh = compute([wanted[i] for i in todo])
        acc.stats.update(fresh.stats)
        if digests is not None and url:
            # entries whose mask selects no row have no statistics: nothing to keep for them
            save(url, {wanted[i][0]: (digests[i], acc.stats[wanted[i][0]]) for i in range(len(wanted)) if wanted[i][0] in acc.stats},
                 storage_options)
    return acc, [f"{wanted[i][0][0]}={wanted[i][0][1]}" for i in todo]
