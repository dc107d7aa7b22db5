"""Build a CAM-shaped network, load weights safely, and cache it once per worker process.

CAM shape: a ``features`` submodule and a ``classifier`` that is a ``Linear`` (or a ``Sequential``
whose first layer is one); the score is ``sigmoid(classifier(mean_ij relu(features(x))))``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pipeline.inference.architectures import DEFAULT_ARCH, build_arch  # noqa: F401 - build_arch re-exported
from pipeline.inference.checkpoint import fingerprint, normalize_keys, read_state_dict
from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.inference.model_spec import ModelSpec  # noqa: F401 - its torch-free home, re-exported here


@dataclass
class CamModel:
    features: nn.Module
    classifier: nn.Linear
    findings: tuple[str, ...]
    version: str
    embedding_dim: int
    spec: ModelSpec

    def to(self, device: torch.device) -> "CamModel":
        # channels_last: oneDNN / cuDNN run DenseNet's convolutions much faster in NHWC
        # (1.65x for DenseNet-121 on the 2-core CPU, see README); results agree within 1e-5.
        self.features.to(device, memory_format=torch.channels_last)
        self.classifier.to(device)
        return self


def cam_head(net: nn.Module, arch: str) -> tuple[nn.Module, nn.Linear]:
    """The network's features and the Linear that maps pooled features to logits."""
    features = getattr(net, "features", None)
    clf = getattr(net, "classifier", None)
    if isinstance(clf, nn.Sequential) and len(clf) and isinstance(clf[0], nn.Linear):
        clf = clf[0]
    if not isinstance(features, nn.Module) or not isinstance(clf, nn.Linear):
        raise ConfigError(
            f"--arch {arch!r} is not CAM-shaped: it needs a 'features' module and a 'classifier' that is a "
            "Linear or a Sequential starting with one"
        )
    return features, clf


# torch's CPU generator is one per process: two threads building at once (an in-process worker
# warming its model while the driver checks it) would mix their draws, and seeded weights would differ
_BUILD = threading.Lock()


def load_model(spec: ModelSpec) -> CamModel:
    """Build ``spec.arch`` and load ``spec.checkpoint`` into it (weights_only / safetensors)."""
    findings = tuple(spec.findings)
    if spec.checkpoint.startswith("random:"):
        try:
            seed = int(spec.checkpoint.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"--checkpoint {spec.checkpoint!r}: random weights take an integer seed, e.g. random:0") from None
        with _BUILD, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_arch(spec.arch, len(findings))
        features, clf = cam_head(net, spec.arch)
    else:
        with _BUILD:  # its random initialisation draws from the generator a seeded build may be using
            net = build_arch(spec.arch, len(findings))
        features, clf = cam_head(net, spec.arch)
        raw = read_state_dict(spec.checkpoint, dict(spec.storage_options))
        state = normalize_keys(raw, set(net.state_dict()))
        for k, v in net.state_dict().items():
            if k.endswith("num_batches_tracked"):  # absent in pre-1.0 checkpoints (e.g. CheXNet's); unused in eval
                state.setdefault(k, v)
        _check_compatible(state, net, clf, findings, spec)
        net.load_state_dict(state, strict=True)
    if spec.outputs:
        clf = select_outputs(clf, spec.outputs)
    if clf.out_features != len(findings):
        raise CheckpointError(f"the classifier has {clf.out_features} outputs but {len(findings)} findings are named")
    net.eval()
    # a network with its own outputs: which outputs, its calibration and its preprocessing are the model too
    # (xrv:densenet121-res224-all and -nih differ only there); CheXNet-style versions stay as they were
    tag = findings if not spec.outputs else findings + (repr((spec.arch, spec.outputs, spec.op_threshs, spec.preprocess, spec.input_size)),)
    version = fingerprint(net.state_dict(), tag)[:16]
    return CamModel(features, clf, findings, version, clf.in_features, spec)


def select_outputs(clf: nn.Linear, outputs: tuple[int, ...]) -> nn.Linear:
    """The classifier's rows ``outputs``, in that order, as a Linear of their own (a network's
    outputs that no finding maps onto, torchxrayvision's unused ones among them, are not computed)."""
    idx = torch.as_tensor(outputs, dtype=torch.long)
    out = nn.Linear(clf.in_features, len(outputs), bias=clf.bias is not None, device=clf.weight.device, dtype=clf.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(clf.weight[idx])
        if clf.bias is not None:
            out.bias.copy_(clf.bias[idx])
    return out.eval()


def _check_compatible(state, net, clf, findings, spec) -> None:
    target = net.state_dict()
    clf_key = next(n for n, p in net.named_parameters() if p is clf.weight)
    if spec.outputs:  # a network with its own outputs: the checkpoint must have all of them
        findings = tuple(f"output {i}" for i in range(clf.out_features))
    if clf_key in state and state[clf_key].shape[0] != len(findings):
        n = state[clf_key].shape[0]
        if n == 1000:  # an ImageNet classifier, not a chest X-ray model
            raise CheckpointError(
                f"{spec.checkpoint} predicts 1000 outputs: it looks like an ImageNet classifier, not a chest X-ray model. "
                f"Use a {len(findings)}-finding chest X-ray checkpoint (such as a CheXNet reproduction), or pass "
                "--findings with 1000 names if you really mean to audit this model."
            )
        raise CheckpointError(
            f"{spec.checkpoint} predicts {n} findings but {len(findings)} are expected "
            f"({', '.join(findings[:3])}, ...). Pass the model's own finding names with --findings."
        )
    missing = sorted(set(target) - set(state))
    extra = sorted(set(state) - set(target))
    if missing or extra:
        raise CheckpointError(
            f"{spec.checkpoint} does not match --arch {spec.arch}: "
            f"{len(missing)} missing keys {missing[:4]}, {len(extra)} unexpected keys {extra[:4]}. "
            "Check --arch, or whether this is a checkpoint of another network."
        )
    wrong = [k for k in target if tuple(state[k].shape) != tuple(target[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{spec.checkpoint}: {len(wrong)} tensors have the wrong shape, e.g. {k} is "
            f"{tuple(state[k].shape)} but --arch {spec.arch} needs {tuple(target[k].shape)}"
        )


_CACHE: dict[tuple[ModelSpec, str], CamModel] = {}
_LOCK = threading.Lock()


def get_model(spec: ModelSpec, device: str, is_current: Callable[[CamModel], bool] | None = None) -> CamModel:
    """Load once per process (one Dask worker) and reuse across that worker's shard tasks.
    ``device`` is the run's policy ('auto', 'cpu', 'cuda[:N]'), resolved here, on the worker.
    A cached model that ``is_current`` rejects is loaded again: a worker that outlives a run (an
    ``address`` cluster, a notebook's) must not score a rewritten checkpoint with the old weights.
    ``is_current`` runs under this cache's lock and must not call get_model."""
    key = (spec, device)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is None or (is_current is not None and not is_current(cached)):
            _CACHE[key] = load_model(spec).to(torch.device(resolve_device(device)))
        return _CACHE[key]


def resolve_device(device: str) -> str:
    """The one place a device policy becomes a device: 'auto' is CUDA where this process sees a
    GPU, else the CPU. Called where the model is placed (each worker), not on the submit host."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device
