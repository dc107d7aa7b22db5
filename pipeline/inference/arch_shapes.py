"""Regenerates ``arch_shapes.json``, the tensor shapes of every registered architecture that
``checkpoint_header`` checks a checkpoint against without importing torch: ``python -m
pipeline.inference.arch_shapes``. It builds each network (torch), so it lives apart from the
torch-free checker (which the model's own loading imports)."""

from __future__ import annotations

import json

from pipeline.inference.architectures import ARCHITECTURES, arch_profile, build_arch
from pipeline.inference.checkpoint_header import SHAPES_FILE
from pipeline.inference.model import cam_head


def write_shapes() -> dict:
    """The registered architectures' state-dict shapes at 14 outputs, and which keys are the classifier."""
    archs = {}
    for name in ARCHITECTURES:
        if arch_profile(name).targets:  # a network with its own outputs (xrv:...): not a 14-finding shape; the load checks it
            continue
        net = build_arch(name, 14)
        _, clf = cam_head(net, name)
        archs[name] = {"classifier": [n for n, p in net.named_parameters() if p is clf.weight or p is clf.bias],
                       "shapes": {k: list(v.shape) for k, v in net.state_dict().items()}}
    return {"_": "written by python -m pipeline.inference.arch_shapes; shapes at 14 outputs",
            "aliases": {"pipeline.inference.tiny_net:tiny_cam_net": "tiny"}, "archs": archs}


if __name__ == "__main__":
    SHAPES_FILE.write_text(json.dumps(write_shapes(), separators=(",", ":")) + "\n")
    print(f"wrote {SHAPES_FILE}")
