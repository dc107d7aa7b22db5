"""maps.zarr: a Zarr v3 group of arrays indexed by manifest row, one chunk per shard."""

from __future__ import annotations

import numpy as np
import zarr

import warnings

from schemas.outputs import CELL_FEATURES, OUTPUT_SCHEMA_VERSION, ZARR_ARRAYS, ZARR_DIMS

from pipeline.core.errors import MisalignedWriteError, OutputError
from pipeline.io.location import Location
from pipeline.store.storage import kwargs_of


def _shape(kind: str, n: int, f: int, h: int, w: int, d: int) -> tuple[int, ...]:
    return {"FHW": (n, f, h, w), "D": (n, d), "CK": (n, h * w, d), "": (n,)}[kind]


def open_maps(url: str, mode: str = "r", storage_options: "dict | Location | None" = None) -> zarr.Group:
    """maps.zarr, opened with the options (or the output root's Location) of its store."""
    # writers read the arrays' own metadata, never the consolidated copy (it could predate a resize)
    kw = {"use_consolidated": False} if mode != "r" else {}
    if "://" in url:
        kw["storage_options"] = kwargs_of(storage_options) or None
    return zarr.open_group(store=url, mode=mode, zarr_format=3, **kw)


def create_maps(url: str, n_rows: int, shard_size: int, findings: tuple[str, ...], grid: tuple[int, int], dim: int, attrs: dict, storage_options: dict | None = None) -> zarr.Group:
    """Create the group, or reopen a compatible one (growing it when the manifest grew)."""
    h, w = grid
    try:
        group = open_maps(url, "a", storage_options)
    except Exception as e:  # noqa: BLE001
        raise OutputError(f"cannot open {url} for writing: {e}") from e
    for name, (dtype, kind, fill) in ZARR_ARRAYS.items():
        shape = _shape(kind, n_rows, len(findings), h, w, dim)
        chunks = (shard_size,) + shape[1:]
        if name in group:
            arr = group[name]
            if tuple(arr.chunks) != chunks or arr.shape[1:] != shape[1:]:
                raise OutputError(
                    f"{url}/{name} has chunks {arr.chunks} and shape {arr.shape}, this run needs chunks {chunks}: "
                    "it was written with another --shard-size or model. Use the same --shard-size or a new --out."
                )
            if arr.shape[0] < n_rows:
                arr.resize(shape)
            continue
        arr_attrs = {"coordinates": "image_id"} if name != "image_id" else {}  # xarray: image_id is a coordinate
        group.create_array(name, shape=shape, chunks=chunks, dtype=str if dtype == "str" else dtype, fill_value=fill,
                           dimension_names=ZARR_DIMS[kind], attributes=arr_attrs)
    _write_coords(group, n_rows, shard_size, findings, h, w)
    group.attrs.update({**attrs, "schema_version": OUTPUT_SCHEMA_VERSION, "findings": list(findings), "shard_size": shard_size,
                        "cell_features": CELL_FEATURES})
    consolidate(url, storage_options)
    return group


def _write_coords(group: zarr.Group, n_rows: int, shard_size: int, findings, h: int, w: int) -> None:
    """Coordinate arrays, written by the driver before any shard runs: image (the manifest row, so
    that .sel(image=rows) takes manifest rows), finding names, cell_row/cell_col (row 0 at the top),
    cell (row-major cell index of cell_features: cell = cell_row * W + cell_col)."""
    values = {"image": np.arange(n_rows, dtype=np.int64), "finding": np.asarray(list(findings), dtype=str),
              "cell_row": np.arange(h, dtype=np.int8), "cell_col": np.arange(w, dtype=np.int8), "cell": np.arange(h * w, dtype=np.int16)}
    for name, data in values.items():
        chunks = (shard_size,) if name == "image" else data.shape
        if name in group and group[name].shape == data.shape and (name != "finding" or list(group[name][:]) == list(findings)):
            continue
        if name in group:
            if name != "image":
                raise OutputError(f"{group.store}/{name} does not match this run ({name} {list(group[name][:])}); use a new --out")
            group[name].resize(data.shape)
        else:
            group.create_array(name, shape=data.shape, chunks=chunks, dtype=str if name == "finding" else data.dtype,
                               dimension_names=(name,), fill_value="" if name == "finding" else 0)
        group[name][:] = data


def consolidate(url: str, storage_options: dict | None = None) -> None:
    """Consolidated metadata, so that xarray and zarr open the group in one read."""
    with warnings.catch_warnings():
        # zarr 3 warns that consolidated metadata is not yet in the v3 spec; xarray and zarr read it
        warnings.filterwarnings("ignore", message=r".*[Cc]onsolidated metadata.*")
        store = url if "://" not in url else zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or None)
        zarr.consolidate_metadata(store, zarr_format=3)


def write_region(group: zarr.Group, start: int, stop: int, values: dict[str, np.ndarray]) -> None:
    """Write rows [start, stop) of every array. The region must be exactly whole chunks, so that
    concurrent shards never touch the same chunk object."""
    for name, data in values.items():
        arr = group[name]
        c = arr.chunks[0]
        n = arr.shape[0]
        if start % c or not (stop % c == 0 or stop == n) or stop > n or start >= stop:
            raise MisalignedWriteError(f"{name}: rows [{start}, {stop}) are not whole chunks of length {c} (array length {n})")
        if data.shape[0] != stop - start or data.shape[1:] != arr.shape[1:]:
            raise MisalignedWriteError(f"{name}: data of shape {data.shape} does not fit rows [{start}, {stop}) of {arr.shape}")
        arr[start:stop] = data


def grid_and_dim(group: zarr.Group) -> tuple[tuple[int, int], int]:
    cam = group["cam"]
    return (cam.shape[2], cam.shape[3]), group["embedding"].shape[1]
