"""Checkpoint formats: read a state_dict safely and map its keys onto the model's.

Accepted: torchvision DenseNet-121 state_dicts (``classifier.weight`` or ``classifier.0.weight``),
the DataParallel CheXNet format (``module.densenet121.`` prefix, old ``norm.1``/``conv.1`` names),
``{'state_dict': ...}`` wrappers, and ``.safetensors``. Pickled whole models are refused.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re

import fsspec
import torch

from .errors import CheckpointError, UnsafeCheckpointError

CONVERT_HINT = (
    "If you trust the file's origin, convert it once with\n"
    "    python -m jobs.convert_checkpoint --trust-pickle {path} {stem}.safetensors\n"
    "and pass the .safetensors file to --checkpoint."
)
_OLD_DENSE = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_PREFIXES = ("module.", "densenet121.", "model.")


def read_state_dict(path: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Load tensors from a .safetensors or a torch file, never executing pickled code."""
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check --checkpoint") from None
    if path.endswith(".safetensors"):
        from safetensors.torch import load as st_load

        try:
            return dict(st_load(data))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
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
    return _unwrap(obj, path)


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


def normalize_keys(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the model's: strip wrappers, modernise DenseNet names, classifier."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p) and k not in target_keys:
                    k, changed = k[len(p):], True
        m = _OLD_DENSE.match(k)
        if m and k not in target_keys:
            k = m.group(1) + m.group(2)  # 'norm.1.weight' -> 'norm1.weight'
        if k not in target_keys:
            alt = {"classifier.weight": "classifier.0.weight", "classifier.bias": "classifier.0.bias",
                   "classifier.0.weight": "classifier.weight", "classifier.0.bias": "classifier.bias"}.get(k)
            if alt in target_keys:
                k = alt
        out[k] = value
    return out


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
        return obj.state_dict()
    return _unwrap(obj, path)
