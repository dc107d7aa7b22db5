"""A checkpoint's tensor names and shapes from its header, without torch and without its weights.

``.safetensors``: the JSON header. torch files (zip or legacy): the pickle, read by an unpickler
that builds shape records instead of tensors and refuses every class torch's ``weights_only``
loader would refuse (a pickled whole model). With the shapes each registered architecture needs
(``arch_shapes.json``, written by ``python -m pipeline.inference.arch_shapes`` and
checked by a test), the job refuses a checkpoint of another network, an ImageNet head or a pickled
model before it starts anything (pipeline.run.validate): in milliseconds, not after the cluster is up.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

from pipeline.core.errors import CheckpointError, UnsafeCheckpointError

SHAPES_FILE = Path(__file__).with_name("arch_shapes.json")
_OLD_DENSE = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_PREFIXES = ("module.", "densenet121.", "model.")
_CLASSIFIER_ALIASES = {"classifier.weight": "classifier.0.weight", "classifier.bias": "classifier.0.bias",
                       "classifier.0.weight": "classifier.weight", "classifier.0.bias": "classifier.bias"}
CONVERT_HINT = (
    "If you trust the file's origin, convert it once with\n"
    "    python -m jobs.convert_checkpoint --trust-pickle {path} {stem}.safetensors\n"
    "and pass the .safetensors file to --checkpoint."
)
MAX_HEADER_BYTES = 64 * 2**20


def normalize_keys(state: dict, target_keys: set[str]) -> dict:
    """Rename checkpoint keys to the model's: strip wrappers, modernise DenseNet names, classifier."""
    out: dict = {}
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
        if k not in target_keys and _CLASSIFIER_ALIASES.get(k) in target_keys:
            k = _CLASSIFIER_ALIASES[k]
        out[k] = value
    return out


# ---- reading the header -----------------------------------------------------------------------------

class _Shape(tuple):
    """A tensor as the header describes it: its shape."""


class _Stub:
    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        pass


def _rebuild_tensor(storage, offset, size, *rest):
    return _Shape(tuple(size))


def _rebuild_parameter(data, *rest):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "tuple"): tuple, ("builtins", "list"): list,
    ("builtins", "dict"): dict, ("builtins", "int"): int, ("builtins", "float"): float, ("builtins", "bool"): bool,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray, ("builtins", "slice"): slice,
}
_TORCH_STUBS = re.compile(r"^(?:[A-Za-z0-9]*Storage|device|dtype|float\d*|bfloat16|half|double|int\d*|long|uint8|bool|"
                          r"(?:memory_)?format|(?:contiguous|channels_last|preserve)_format|strided|layout)$")


class _Unknown(Exception):
    """A global torch may allow (numpy and the like): the header cannot tell; the full load decides."""


class _HeaderUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and _TORCH_STUBS.match(name):
            return _Stub
        if module.split(".")[0] in ("numpy", "_codecs", "torch"):
            raise _Unknown(f"{module}.{name}")
        raise UnsafeCheckpointError(f"{module}.{name}")

    def persistent_load(self, pid):
        return ("storage", pid)


def _unpickle(data: bytes):
    return _HeaderUnpickler(io.BytesIO(data)).load()


def regular_file_info(fs, p: str, path: str) -> dict:
    """fs.info of a checkpoint that is a regular file; CheckpointError otherwise (a FIFO would block
    a read forever, /dev/zero never end, a directory give a traceback). Before any open of it."""
    info = fs.info(p)
    if info.get("type", "file") != "file":
        raise CheckpointError(f"checkpoint {path} is not a regular file ({_kind(p, info)}); "
                              "--checkpoint must name a .safetensors or .pt/.pth file")
    return info


def _kind(path: str, info: dict) -> str:
    """What a path that is not a regular file is, in words (a local one from its mode)."""
    import os
    import stat

    if info.get("type") == "directory":
        return "a directory"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return str(info.get("type"))
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return str(info.get("type"))


def tensor_shapes(path: str, storage_options: dict | None = None) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} of the checkpoint's tensors, read from its header; None when the header cannot
    tell (a format or global only the full load understands). Raises UnsafeCheckpointError for a
    pickled object torch's weights_only loader refuses, CheckpointError for an unreadable header."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    regular_file_info(fs, p, path)
    try:
        with fs.open(p, "rb") as f:
            if path.endswith(".safetensors"):
                return _safetensors_shapes(f, path)
            head = f.read(4)
            f.seek(0)
            if head == b"PK\x03\x04":
                try:
                    with zipfile.ZipFile(f) as zf:
                        pkl = [m for m in zf.infolist() if m.filename.endswith("data.pkl")]
                        if len(pkl) != 1 or pkl[0].file_size > MAX_HEADER_BYTES:
                            return None
                        obj = _unpickle(zf.read(pkl[0]))
                except zipfile.BadZipFile as e:
                    raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from None
            else:
                obj = _legacy(f)
    except _Unknown:
        return None
    except UnsafeCheckpointError as e:
        stem = path.rsplit(".", 1)[0]
        raise UnsafeCheckpointError(
            f"{path} holds pickled Python objects (here {e}: for example a whole model), which can run code when "
            "loaded, so it is not unpickled.\n" + CONVERT_HINT.format(path=path, stem=stem)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, struct.error):
        return None  # let the full load say what is wrong with it
    return _state_shapes(obj)


def _safetensors_shapes(f, path: str) -> dict[str, tuple[int, ...]]:
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{path} is not a valid safetensors file: {len(raw)} bytes")
    n = struct.unpack("<Q", raw)[0]
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path} is not a valid safetensors file: its header claims {n} bytes")
    try:
        header = json.loads(f.read(n))
    except ValueError as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: unreadable header ({e})") from None
    return {k: tuple(v.get("shape", ())) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _legacy(f):
    """Legacy torch format: magic number, protocol, system info, then the object (then storages)."""
    data = f.read(MAX_HEADER_BYTES)
    stream = io.BytesIO(data)
    obj = None
    for _ in range(4):
        obj = _HeaderUnpickler(stream).load()
    return obj


def _state_shapes(obj) -> dict[str, tuple[int, ...]] | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        shapes = {k: tuple(v) for k, v in obj.items() if isinstance(v, _Shape)}
        return shapes or None
    return None


# ---- checking it against --arch ----------------------------------------------------------------------

def arch_shapes(arch: str) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]] | None:
    """(shapes at 14 outputs, classifier keys) that a registered architecture needs; None when unknown."""
    doc = json.loads(SHAPES_FILE.read_text())
    entry = doc["archs"].get(doc["aliases"].get(arch, arch))
    if entry is None:
        return None
    return {k: tuple(v) for k, v in entry["shapes"].items()}, tuple(entry["classifier"])


def _registered() -> list[str]:
    return sorted(json.loads(SHAPES_FILE.read_text())["archs"])


def _keys_fit(shapes: dict, arch: str) -> bool:
    need = arch_shapes(arch)
    if need is None:
        return False
    target = need[0]
    state = normalize_keys(shapes, set(target))
    return set(state) <= set(target) and all(k in state for k in target if not k.endswith("num_batches_tracked"))


def check_header(path: str, arch: str, findings: tuple[str, ...], storage_options: dict | None = None) -> None:
    """Refuse a checkpoint whose header shows it cannot load into ``arch`` with ``findings`` outputs
    (CheckpointError, UnsafeCheckpointError): the same verdicts as the full load, before it."""
    shapes = tensor_shapes(path, storage_options)
    need = arch_shapes(arch)
    if shapes is None or need is None:
        return
    target, clf = need
    target = {k: ((len(findings),) + s[1:] if k in clf else s) for k, s in target.items()}
    state = normalize_keys(shapes, set(target))
    if clf[0] in state and state[clf[0]][0] != len(findings):
        n = state[clf[0]][0]
        if n == 1000:
            raise CheckpointError(
                f"{path} predicts 1000 outputs: it looks like an ImageNet classifier, not a chest X-ray model. "
                f"Use a {len(findings)}-finding chest X-ray checkpoint (such as a CheXNet reproduction), or pass "
                "--findings with 1000 names if you really mean to audit this model.")
        raise CheckpointError(f"{path} predicts {n} findings but {len(findings)} are expected "
                              f"({', '.join(findings[:3])}, ...). Pass the model's own finding names with --findings.")
    missing = sorted(k for k in set(target) - set(state) if not k.endswith("num_batches_tracked"))
    extra = sorted(set(state) - set(target))
    if missing or extra:
        fits = [a for a in _registered() if a != arch and _keys_fit(shapes, a)]
        hint = f"Its tensors fit --arch {fits[0]}." if fits else f"Check --arch (registered: {', '.join(_registered())})."
        raise CheckpointError(
            f"{path} does not match --arch {arch}: {len(missing)} missing keys {missing[:4]}, {len(extra)} unexpected keys "
            f"{extra[:4]}. {hint} Or is this a checkpoint of another network?")
    wrong = [k for k in target if k in state and tuple(state[k]) != tuple(target[k])]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: {len(wrong)} tensors have the wrong shape, e.g. {k} is {tuple(state[k])} "
                              f"but --arch {arch} needs {tuple(target[k])}. Check --arch.")
