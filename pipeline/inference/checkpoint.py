"""Checkpoint formats: read a state_dict safely and map its keys onto the model's.

Accepted: torchvision DenseNet-121 state_dicts (``classifier.weight`` or ``classifier.0.weight``),
the DataParallel CheXNet format (``module.densenet121.`` prefix, old ``norm.1``/``conv.1`` names),
``{'state_dict': ...}`` wrappers, and ``.safetensors``. Pickled whole models are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import pickletools
import struct
import zipfile

import fsspec
import torch

from pipeline.core.errors import CheckpointError, UnsafeCheckpointError
from pipeline.inference.checkpoint_header import CONVERT_HINT, normalize_keys, regular_file_info  # noqa: F401 - normalize_keys re-exported (its torch-free home)


MAX_CHECKPOINT_BYTES = 4 * 2**30  # DenseNet-121 is 28 MB; a file this large is not a CAM classifier
MAX_PICKLE_BYTES = 64 * 2**20  # a state_dict's pickle is names and shapes: kilobytes
MAX_SAFETENSORS_HEADER = 16 * 2**20
_FLOATING = {"F16", "BF16", "F32", "F64"}
_STORAGE_BYTES = {"DoubleStorage": 8, "LongStorage": 8, "FloatStorage": 4, "IntStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                  "ShortStorage": 2, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1, "UntypedStorage": 1}
_COUNTERS = ("num_batches_tracked",)  # BatchNorm's step counter: the one integer a state_dict holds


def read_state_dict(path: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Load tensors from a .safetensors or a torch file, never executing pickled code. Sizes are
    checked before anything is inflated; only finite floating-point weights are accepted."""
    try:
        fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
        info = regular_file_info(fs, p, path)
        size = info.get("size")
        if size is not None and size > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(f"{path} has {size} bytes, more than the {MAX_CHECKPOINT_BYTES} a checkpoint may have")
        with fs.open(p, "rb") as f:
            data = f.read(MAX_CHECKPOINT_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check --checkpoint") from None
    if len(data) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path} has more than the {MAX_CHECKPOINT_BYTES} bytes a checkpoint may have")
    if path.endswith(".safetensors"):
        from safetensors.torch import load as st_load

        _check_safetensors_header(data, path)
        try:
            state = dict(st_load(data))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
        return check_tensors(state, path)
    _check_torch_sizes(data, path)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        stem = path.rsplit(".", 1)[0]
        raise UnsafeCheckpointError(
            f"{path} holds pickled Python objects (for example a whole model), which can run code "
            f"when loaded, so it is not unpickled.\n" + CONVERT_HINT.format(path=path, stem=stem) + f"\n(detail: {str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e
    return check_tensors(_unwrap(obj, path), path)


def check_tensors(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Floating-point, finite weights only (an int8 or NaN tensor would load and score nonsense)."""
    for name, t in state.items():
        if name.endswith(_COUNTERS) and not t.is_floating_point():
            continue
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}; only floating-point weights are accepted "
                                  "(quantized checkpoints must be dequantized first)")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name!r} holds {bad} NaN/Inf values of {t.numel()}; the checkpoint is corrupt")
    return state


def _check_safetensors_header(data: bytes, path: str) -> None:
    """The 8-byte header length, then the header's dtypes and extents, before the library reads."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is not a valid safetensors file: {len(data)} bytes")
    n = struct.unpack("<Q", data[:8])[0]
    if n > min(len(data) - 8, MAX_SAFETENSORS_HEADER):
        raise CheckpointError(f"{path} is not a valid safetensors file: its header claims {n} bytes, the file has {len(data)}")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: unreadable header ({e})") from None
    body = len(data) - 8 - n
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        dtype, (start, stop) = entry.get("dtype"), entry.get("data_offsets", (0, 0))
        if not (0 <= start <= stop <= body):
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file ({start}..{stop} of {body} bytes)")
        if dtype not in _FLOATING and not name.endswith(_COUNTERS):
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; only floating-point weights are accepted "
                                  "(quantized checkpoints must be dequantized first)")


def _check_torch_sizes(data: bytes, path: str) -> None:
    """Refuse a torch file whose parts would inflate: zip members larger than the file could hold,
    or storages the pickle declares larger than the bytes that back them (4 MB -> 4 GiB)."""
    if data[:4] == b"PK\x03\x04":
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            members = zf.infolist()
        except (zipfile.BadZipFile, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from None
        total = sum(m.file_size for m in members)
        if total > len(data) + 2**20:  # torch stores members uncompressed: more inside than outside is a bomb
            raise CheckpointError(f"{path}: its zip members inflate to {total} bytes from a {len(data)}-byte file; refused")
        pkl = [m for m in members if m.filename.endswith("data.pkl")]
        if len(pkl) != 1 or pkl[0].file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: expected one data.pkl of at most {MAX_PICKLE_BYTES} bytes in the torch zip file")
        backing = total
        pickle_bytes = zf.read(pkl[0])
    else:
        backing, pickle_bytes = len(data), data  # legacy format: the storages follow the pickles in the file
    declared = _declared_storage_bytes(pickle_bytes)
    if declared > backing:
        raise CheckpointError(f"{path}: its pickle declares {declared} bytes of tensor storage but the file holds {backing}; refused")


def _declared_storage_bytes(pickle_bytes: bytes, max_pickles: int = 5) -> int:
    """Sum of the storage sizes in the pickles' persistent ids ('storage', type, key, location, size),
    read from the opcode stream without unpickling (memo lookups followed). A legacy torch file is
    several pickles in a row (magic, protocol, sys info, the state_dict, storage keys), then data."""
    stream = io.BytesIO(pickle_bytes)
    total = 0
    for _ in range(max_pickles):
        if stream.tell() >= len(pickle_bytes):
            break
        try:
            total += _scan_pickle(stream)
        except Exception:  # noqa: BLE001 - past the pickles (raw storage bytes), or a stream for torch.load to reject
            break
    return total


def _scan_pickle(stream) -> int:
    memo: dict = {}
    last = None
    total = 0
    current: list | None = None
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg if name != "MEMOIZE" else len(memo)] = last
            continue
        last = memo.get(arg) if name in ("GET", "BINGET", "LONG_BINGET") else arg
        if last == "storage" and name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINGET", "LONG_BINGET", "GET"):
            current = []
            continue
        if current is not None:
            if isinstance(last, str) and last.endswith("Storage"):
                current.append(("type", last))
            elif isinstance(last, int) and not isinstance(last, bool) and name not in ("PROTO", "FRAME", "BINGET", "LONG_BINGET", "GET"):
                current.append(("int", last))
            if name in ("BINPERSID", "PERSID"):
                kind = next((v for k, v in current if k == "type"), "UntypedStorage").rsplit(".", 1)[-1].split(" ")[-1]
                ints = [v for k, v in current if k == "int"]
                total += (ints[0] if ints else 0) * _STORAGE_BYTES.get(kind, 1)
                current = None
    return total


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path} holds no tensors I can use as a state_dict (found {type(obj).__name__})")


def fingerprint(state: dict[str, torch.Tensor], findings: tuple[str, ...]) -> str:
    """Content hash of the weights (names, dtypes, shapes, bytes) and the finding order."""
    h = hashlib.sha256()
    h.update(("\x1f".join(findings)).encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"\x1e{k}\x1f{t.dtype}\x1f{tuple(t.shape)}\x1f".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_safetensors(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save as st_save

    blob = st_save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=metadata)
    with fsspec.open(path, "wb") as f:
        f.write(blob)


def state_dict_from_pickle(path: str) -> dict[str, torch.Tensor]:
    """Only for jobs.convert_checkpoint --trust-pickle: this executes code from the file."""
    obj = torch.load(path, map_location="cpu", weights_only=False)  # noqa: S614 - explicit user trust
    if isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        obj = obj["model"]
    if isinstance(obj, torch.nn.Module):
        for mod in obj.modules():  # modules pickled by torch < 1.6 (torchxrayvision's DenseNet files), as it patches them
            if not hasattr(mod, "_non_persistent_buffers_set"):
                mod._non_persistent_buffers_set = set()
        # torchxrayvision's calibration travels with --arch xrv:..., not as a tensor of the checkpoint
        return {k: v for k, v in obj.state_dict().items() if k != "op_threshs"}
    return _unwrap(obj, path)
