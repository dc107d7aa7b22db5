"""maps.zarr: a Zarr v3 group of arrays indexed by manifest row, one chunk per shard."""

from __future__ import annotations

import numpy as np
import zarr

from schemas.outputs import OUTPUT_SCHEMA_VERSION, ZARR_ARRAYS

from .errors import MisalignedWriteError, OutputError


def _shape(kind: str, n: int, f: int, h: int, w: int, d: int) -> tuple[int, ...]:
    return {"FHW": (n, f, h, w), "D": (n, d), "CK": (n, h * w, d), "": (n,)}[kind]


def open_maps(url: str, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    return zarr.open_group(store=url, mode=mode, storage_options=storage_options or None, zarr_format=3) if "://" in url else zarr.open_group(store=url, mode=mode, zarr_format=3)


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
        group.create_array(name, shape=shape, chunks=chunks, dtype=str if dtype == "str" else dtype, fill_value=fill)
    from .cam import CELL_FEATURES

    group.attrs.update({**attrs, "schema_version": OUTPUT_SCHEMA_VERSION, "findings": list(findings), "shard_size": shard_size,
                        "cell_features": CELL_FEATURES})
    return group


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
