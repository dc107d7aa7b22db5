import re
import subprocess
import sys

import pytest
import torch

from pipeline.core.findings import CHEXNET_FINDINGS
from pipeline.inference.checkpoint import save_safetensors
from pipeline.inference.arch_shapes import write_shapes
from pipeline.inference.checkpoint_header import SHAPES_FILE, check_header, tensor_shapes
from pipeline.core.errors import CheckpointError, UnsafeCheckpointError
from pipeline.inference.model import ModelSpec, load_model
from pipeline.inference.tiny_net import TinyCAMNet

from tests.conftest import TINY_ARCH


@pytest.fixture(scope="module")
def dense_state():
    from torchvision.models import densenet121  # here: torchvision (and torch._dynamo) cost every test process ~2.5 s to import

    torch.manual_seed(3)
    return densenet121(weights=None, num_classes=14).state_dict()


def _chexnet_dataparallel(state):
    """The arnoweng/reproduce-chexnet format: DataParallel prefix, old 'norm.1' names, Sequential head."""
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):  # PyTorch 0.3 checkpoints have none
            continue
        k2 = re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])", r"\1\2.\3", k)
        k2 = k2.replace("classifier.", "classifier.0.")
        out["module.densenet121." + k2] = v
    return out


def test_densenet_formats_load_to_the_same_model_version(tmp_path, dense_state):
    plain = tmp_path / "plain.pth"
    torch.save(dense_state, plain)
    seq = tmp_path / "seq.pt"
    torch.save({k.replace("classifier.", "classifier.0."): v for k, v in dense_state.items()}, seq)
    dp = tmp_path / "chexnet.pth.tar"
    torch.save({"state_dict": _chexnet_dataparallel(dense_state), "epoch": 3}, dp)
    st = tmp_path / "w.safetensors"
    save_safetensors(dense_state, str(st))
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": _chexnet_dataparallel(dense_state)}, legacy, _use_new_zipfile_serialization=False)
    models = {p.name: load_model(ModelSpec("densenet121", str(p))) for p in (plain, seq, dp, st, legacy)}
    assert len({m.version for m in models.values()}) == 1
    for p in (plain, seq, dp, st, legacy):  # the torch-free header check (pipeline.run.validate) accepts each, from its shapes
        assert len(tensor_shapes(str(p))) >= 727 - 121, p.name  # 121 num_batches_tracked absent from the CheXNet format
        check_header(str(p), "densenet121", CHEXNET_FINDINGS)
    m = models[dp.name]
    assert torch.equal(m.classifier.weight, dense_state["classifier.weight"])
    assert torch.equal(m.features.denseblock1.denselayer1.norm1.running_var, dense_state["features.denseblock1.denselayer1.norm1.running_var"])


def test_version_depends_on_content_not_file_name(tmp_path, tiny_ckpt):
    a = load_model(ModelSpec(TINY_ARCH, tiny_ckpt)).version
    state = load_model(ModelSpec(TINY_ARCH, tiny_ckpt)).classifier.state_dict()
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(open(tiny_ckpt, "rb").read())
    assert load_model(ModelSpec(TINY_ARCH, str(copy))).version == a
    full = TinyCAMNet(14).state_dict()
    from safetensors.torch import load_file

    full.update(load_file(tiny_ckpt))
    full["classifier.bias"] = state["bias"] + 1.0
    changed = tmp_path / "changed.safetensors"
    save_safetensors(full, str(changed))
    assert load_model(ModelSpec(TINY_ARCH, str(changed))).version != a


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_whole_model_is_refused_and_convertible(tmp_path, tiny_ckpt):
    net = load_model(ModelSpec(TINY_ARCH, tiny_ckpt))
    whole = TinyCAMNet(14)
    whole.features, whole.classifier = net.features, net.classifier
    src = tmp_path / "whole.pth.tar"
    torch.save({"model": whole, "epoch": 1}, src)
    with pytest.raises(UnsafeCheckpointError, match="jobs.convert_checkpoint --trust-pickle"):
        load_model(ModelSpec(TINY_ARCH, str(src)))
    dst = tmp_path / "converted.safetensors"
    refused = subprocess.run([sys.executable, "-m", "jobs.convert_checkpoint", str(src), str(dst)], capture_output=True, text=True)
    assert refused.returncode == 2 and not dst.exists()
    ok = subprocess.run([sys.executable, "-m", "jobs.convert_checkpoint", "--trust-pickle", str(src), str(dst)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert load_model(ModelSpec(TINY_ARCH, str(dst))).version == net.version


def test_arbitrary_pickle_payload_is_not_executed(tmp_path, capfd):
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, p)
    with pytest.raises(UnsafeCheckpointError):
        load_model(ModelSpec(TINY_ARCH, str(p)))
    assert "pwned" not in capfd.readouterr().out


def test_missing_extra_and_wrong_output_count(tmp_path, tiny_ckpt):
    from safetensors.torch import load_file

    state = load_file(tiny_ckpt)
    missing = dict(state)
    missing.pop("features.0.weight")
    extra = dict(state, **{"head.weight": torch.zeros(2)})
    for name, s, pattern in (("missing", missing, "1 missing keys"), ("extra", extra, "1 unexpected keys")):
        path = tmp_path / f"{name}.safetensors"
        save_safetensors(s, str(path))
        with pytest.raises(CheckpointError, match=pattern):
            load_model(ModelSpec(TINY_ARCH, str(path)))
    torch.manual_seed(0)
    five = TinyCAMNet(5).state_dict()
    p5 = tmp_path / "five.pt"
    torch.save(five, p5)
    with pytest.raises(CheckpointError, match="predicts 5 findings but 14 are expected.*--findings"):
        load_model(ModelSpec(TINY_ARCH, str(p5)))
    m = load_model(ModelSpec(TINY_ARCH, str(p5), findings=("A", "B", "C", "D", "E")))
    assert m.classifier.out_features == 5


def test_missing_checkpoint_and_non_cam_arch(tmp_path):
    from pipeline.core.errors import ConfigError

    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(ModelSpec(TINY_ARCH, str(tmp_path / "nope.pt")))
    with pytest.raises(ConfigError, match="not CAM-shaped"):
        load_model(ModelSpec("torchvision.models:resnet18", "random:0"))
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_model(ModelSpec("no_such_module:f", "random:0"))


def test_a_worker_refuses_weights_other_than_the_ones_the_run_checked(tmp_path):
    """A checkpoint replaced while a run is going (a nightly update landing mid-run) is refused by
    the worker that loads it, rather than scored under the old version's name."""
    from pipeline.inference.precision import run_version
    from pipeline.worker.runspec import RunSpec
    from pipeline.worker.score_shard import check_weights

    ckpt = tmp_path / "model.safetensors"
    save_safetensors(TinyCAMNet(14).state_dict(), str(ckpt))
    spec = ModelSpec(TINY_ARCH, str(ckpt))
    checked = load_model(spec)
    run = RunSpec(out=str(tmp_path), model=spec, model_version=run_version(checked.version, "bf16"), baselines=(0.1,) * 14,
                  precision="bf16")
    check_weights(checked, run)  # the same weights: scored
    save_safetensors(TinyCAMNet(14).state_dict(), str(ckpt))  # replaced with other weights
    with pytest.raises(CheckpointError, match="changed during the run"):
        check_weights(load_model(spec), run)


def test_seeded_random_weights_are_the_same_when_built_in_threads_at_once():
    """An in-process worker loads the run's model while the driver checks it (decode_pool.warm):
    both seed torch's one CPU generator, and their draws must not mix."""
    import threading

    spec = ModelSpec(TINY_ARCH, "random:3")
    expected = load_model(spec).version
    for _ in range(5):
        barrier, versions = threading.Barrier(6), []

        def build(barrier=barrier, versions=versions):
            barrier.wait()
            versions.append(load_model(spec).version)

        threads = [threading.Thread(target=build) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert versions == [expected] * 6


def test_a_worker_that_outlives_a_run_loads_a_rewritten_checkpoint_again(tmp_path):
    """Workers cache their model across runs (an `address` cluster, a notebook's): a nightly update
    written over the same checkpoint path is loaded again, not scored with the cached old weights."""
    from pipeline.inference import model as model_cache
    from pipeline.inference.precision import run_version
    from pipeline.worker.runspec import RunSpec
    from pipeline.worker.score_shard import _load_model_in_thread

    ckpt = tmp_path / "nightly.safetensors"
    save_safetensors(TinyCAMNet(14).state_dict(), str(ckpt))
    spec = ModelSpec(TINY_ARCH, str(ckpt))
    try:
        old = model_cache.get_model(spec, "cpu")  # yesterday's run on this worker
        save_safetensors(TinyCAMNet(14).state_dict(), str(ckpt))  # tonight's weights, same path
        new_version = load_model(spec).version
        assert new_version != old.version
        run = RunSpec(out=str(tmp_path), model=spec, model_version=run_version(new_version, "fp32"), baselines=(0.1,) * 14, device="cpu")
        _torch, _infer, model = _load_model_in_thread(run).result(timeout=60)
        assert model.version == new_version
    finally:
        model_cache._CACHE.pop((spec, "cpu"), None)


def test_a_shard_fails_when_the_checkpoint_changes_after_the_run_checked_it(tmp_path, tiny_nih):
    """The nightly update lands mid-run: the shard's worker loads the new file, and the shard fails
    with the reason rather than writing the new weights' scores under the old version's name."""
    from pipeline.inference import model as model_cache
    from pipeline.config.run_config import ScoreConfig
    from pipeline.worker.score_shard import score_shard
    from pipeline.run.scoring import prepare_run

    ckpt = tmp_path / "nightly.safetensors"
    save_safetensors(TinyCAMNet(14).state_dict(), str(ckpt))
    cfg = ScoreConfig.of(datasets=(f"nih:{tiny_nih}",), out=str(tmp_path / "out"), checkpoint=str(ckpt), arch=TINY_ARCH,
                         shard_size=16, device="cpu", decode_workers=0)
    prep = prepare_run(cfg)
    save_safetensors(TinyCAMNet(14).state_dict(), str(ckpt))  # replaced after the driver's check
    shard = prep.pending[0]
    try:
        with pytest.raises(CheckpointError, match="changed during the run"):
            score_shard(shard, prep.spec)
    finally:
        model_cache._CACHE.pop((prep.spec.model, prep.spec.device), None)
    assert not list((tmp_path / "out").glob("runs/*/predictions/*.parquet"))  # nothing written under the old name


def test_the_shapes_the_header_check_expects_are_the_architectures_own():
    """arch_shapes.json is what the registered architectures build (regenerate: python -m pipeline.inference.arch_shapes)."""
    import json

    assert json.loads(SHAPES_FILE.read_text()) == json.loads(json.dumps(write_shapes()))
