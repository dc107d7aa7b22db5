"""The command line: configuration errors early (exit 2, fast, nothing written, torch not imported),
clusters that bring up no worker, --version everywhere, the cxr-audit entry point, the README's flag table."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs._common import plain
from jobs.cli import COMMANDS
from jobs.cli import main as cli_main
from jobs.score_dataset import parser

from tests.conftest import TINY_ARCH

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FAKE_SBATCH = "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified' >&2\nexit 1\n"

# Runs main() for each case in one fresh interpreter and reports exit status, stderr, elapsed time,
# whether torch got imported and whether --out appeared.
_CHILD = """
import contextlib, io, json, os, sys, time
from jobs.score_dataset import main
results = []
for args, out in json.loads(sys.argv[1]):
    err = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    results.append({"rc": rc, "err": err.getvalue(), "seconds": time.perf_counter() - t,
                    "torch": "torch" in sys.modules, "out_exists": os.path.exists(out)})
print(json.dumps(results))
"""


def _bad_inputs(tmp_path, tiny_nih) -> dict:
    """Files a user passes by mistake: checkpoints of another network, an ImageNet head, a pickled
    whole model, a manifest without a path column."""
    import torch
    from torchvision.models import densenet121, resnet18

    from pipeline.inference.checkpoint import save_safetensors
    from pipeline.inference.tiny_net import TinyCAMNet

    files = {k: tmp_path / name for k, name in (("imagenet", "imagenet.safetensors"), ("resnet", "resnet18.pt"),
                                                ("whole", "whole.pt"), ("manifest", "films.csv"))}
    save_safetensors(densenet121(weights=None).state_dict(), str(files["imagenet"]))  # 1000 outputs
    torch.save(resnet18(weights=None, num_classes=14).state_dict(), files["resnet"])
    torch.save(TinyCAMNet(14), files["whole"])  # a pickled nn.Module
    film = next(tiny_nih.glob("images_*/images/*.png"))
    files["manifest"].write_text(f"image_id,file\n{film.name},{film}\n")
    return files


def _config_error_cases(tmp_path, tiny_nih, tiny_ckpt):
    out = str(tmp_path / "out")
    base = ["--dataset", f"nih:{tiny_nih}", "--checkpoint", tiny_ckpt, "--arch", TINY_ARCH, "--out", out]
    bad = _bad_inputs(tmp_path, tiny_nih)
    dense = ["--dataset", f"nih:{tiny_nih}", "--out", out, "--checkpoint"]  # --arch densenet121, the default
    return out, {
        "ImageNet DenseNet-121": (dense + [str(bad["imagenet"])], "looks like an ImageNet classifier"),
        "ResNet-18 with 14 outputs": (dense + [str(bad["resnet"])], "does not match --arch densenet121"),
        "the demo's tiny net as DenseNet-121": (dense + [tiny_ckpt], "Its tensors fit --arch tiny"),
        "tiny net with the wrong head": (base + ["--findings", "A,B"], "predicts 14 findings but 2 are expected"),
        "pickled whole model": (dense + [str(bad["whole"])], "pickled Python objects"),
        "manifest without a path column": (["--dataset", f"manifest:{bad['manifest']}"] + base[2:], "has no path column"),
        "nih: at ROOT/images_001/images": (["--dataset", f"nih:{tiny_nih}/images_001/images"] + base[2:], f"--dataset nih:{tiny_nih}"),
        "wrong --cluster name": (base + ["--cluster", "nosuch"], "no profile 'nosuch'"),
        "missing --cluster-file": (base + ["--cluster-file", str(tmp_path / "absent.yaml")], "--cluster-file"),
        "missing checkpoint": (base[:3] + [str(tmp_path / "absent.safetensors")] + base[4:], "no such file"),
        "unknown adapter": (["--dataset", "bogus:/x"] + base[2:], "adapter 'bogus' is unknown"),
        "missing dataset root": (["--dataset", f"nih:{tmp_path / 'nowhere'}"] + base[2:], "does not exist"),
        "bad device": (base + ["--device", "tpu"], "--device 'tpu'"),
        "bad shard size": (base + ["--shard-size", "0"], "--shard-size"),
        "missing baselines file": (base + ["--baselines", str(tmp_path / "absent.json")], "--baselines"),
        "unimportable arch": (base[:4] + ["--arch", "no_such_module:net"] + base[6:], "cannot be found"),
        "missing required flags": (["--dataset", f"nih:{tiny_nih}", "--out", out], "required"),
        "slurm without sbatch": (base + ["--cluster", "slurm"], "sbatch"),
    }


def test_every_configuration_error_exits_2_fast_with_nothing_written_and_no_torch(tmp_path, tiny_nih, tiny_ckpt):
    out, cases = _config_error_cases(tmp_path, tiny_nih, tiny_ckpt)
    env = dict(os.environ, PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "sbatch").exists()),
               PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([(args, out) for args, _ in cases.values()])],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = dict(zip(cases, json.loads(proc.stdout)))
    for name, r in results.items():
        assert r["rc"] == 2, (name, r)
        assert cases[name][1] in r["err"], (name, r["err"])
        assert "Traceback" not in r["err"] and "\x1b[" not in r["err"], (name, r["err"])
        assert not r["out_exists"], f"{name}: --out was created"
        assert not r["torch"], f"{name}: torch was imported before the configuration was validated"
        assert r["seconds"] < 10, (name, r["seconds"])  # goal: < 2 s; measured ~0.05 s each after the first
    print(f"config errors in one interpreter: {json.dumps({k: round(v['seconds'], 3) for k, v in results.items()})}; "
          f"all {len(cases)} incl. interpreter start {time.perf_counter() - t:.2f} s")


@pytest.mark.parametrize("extra", [["--cluster", "nosuch"], ["--cluster-file", "absent.yaml"], ["--checkpoint", "absent.safetensors"],
                                   ["--arch", "densenet121"]])  # the tiny checkpoint's shapes, refused from its header
def test_a_configuration_error_from_the_shell_takes_under_two_seconds_of_wall_clock(tmp_path, tiny_nih, tiny_ckpt, extra):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.score_dataset", "--dataset", f"nih:{tiny_nih}", "--checkpoint", tiny_ckpt,
           "--arch", TINY_ARCH, "--out", str(out), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    seconds = time.perf_counter() - t
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert "terminate called" not in proc.stderr and proc.stderr.count("\n") <= 3, proc.stderr  # the error alone
    assert not out.exists() and not list(tmp_path.iterdir())
    assert seconds < 10, seconds  # generous bound for a loaded machine; the goal (and typical figure) is < 2 s
    print(f"{' '.join(extra)}: exit 2 after {seconds:.2f} s wall clock")


def test_a_failure_after_validation_leaves_no_empty_out_folder(tmp_path, tiny_nih, capsys):
    from jobs.score_dataset import main

    import torch

    bad = tmp_path / "nan.safetensors"
    from pipeline.inference.checkpoint import save_safetensors
    from pipeline.inference.tiny_net import TinyCAMNet

    state = TinyCAMNet(14).state_dict()
    state["classifier.weight"][0, 0] = torch.nan  # the header is fine: only loading the weights finds it
    save_safetensors(state, str(bad))
    out = tmp_path / "new" / "out"
    assert main(["--dataset", f"nih:{tiny_nih}", "--checkpoint", str(bad), "--arch", TINY_ARCH, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "NaN/Inf values" in err
    assert not out.exists() and not (tmp_path / "new").exists()


def test_slurm_cluster_whose_jobs_never_start_is_an_error_naming_the_cause(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue", reason="the slurm extra (dask-jobqueue) is not installed")
    from pipeline.run.cluster import load_profile, start_cluster
    from pipeline.core.errors import ClusterStartError

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", "#!/bin/sh\nexit 0\n"), ("squeue", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    profiles = tmp_path / "cluster.yaml"
    profiles.write_text("profiles:\n  slurm:\n    type: slurm\n    jobs: 1\n    cores: 1\n    memory: 1GB\n"
                        f"    log_directory: {tmp_path / 'logs'}\n    worker_timeout: 3\n")
    profile = load_profile("slurm", str(profiles), required=True)
    assert profile.worker_timeout == 3 and "worker_timeout" not in profile.options
    t = time.perf_counter()
    with pytest.raises(ClusterStartError, match=r"brought up no worker in 3 s.*Invalid account") as e:
        start_cluster(profile)
    assert time.perf_counter() - t < 60
    assert "--worker-timeout" in str(e.value)


def test_missing_cluster_file_is_an_error_but_the_default_falls_back(tmp_path, monkeypatch):
    from pipeline.run.cluster import load_profile
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(None, str(tmp_path / "absent.yaml"), required=True)
    monkeypatch.chdir(tmp_path)  # no cluster.yaml here: the built-in local profiles
    assert load_profile(None, "cluster.yaml").type == "local"


def test_convert_checkpoint_on_a_missing_file_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.convert_checkpoint", "--trust-pickle", str(tmp_path / "absent.pth"),
                           str(tmp_path / "x.safetensors")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_messages_carry_no_terminal_escape_codes():
    assert plain("two options, \x1b[1mdo those steps only if you trust the source\x1b[0m.") == \
        "two options, do those steps only if you trust the source."


def _job_modules() -> list[str]:
    import importlib.util

    names = {m for m, _ in COMMANDS.values()}  # every job (tests/test_packaging.py)
    return sorted(m for m in names if importlib.util.find_spec(m) is not None)


@pytest.mark.parametrize("module", _job_modules())
def test_every_job_has_version(module, capsys):
    import importlib

    import pipeline

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"cxr-audit {pipeline.__version__}"


def test_cxr_audit_entry_point_dispatches_by_name(tmp_path, capsys):
    assert cli_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS)
    assert cli_main(["nosuch"]) == 2
    assert cli_main(["runs", "--out", str(tmp_path)]) == 0
    assert "no runs under" in capsys.readouterr().out
    assert cli_main(["runs", "--out", str(tmp_path), "--latest"]) == 1


def test_package_metadata_agrees():
    import tomllib

    import pipeline

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["version"] == pipeline.__version__
    assert meta["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()
    assert meta["scripts"]["cxr-audit"] == "jobs.cli:main"
    assert f"## {pipeline.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    for pkg in ("pipeline", "jobs", "schemas"):
        assert (ROOT / pkg / "py.typed").exists()
    assert not any("dask-kubernetes" in d for d in meta["optional-dependencies"]["test"])  # heavy; its test skips without it


def _readme_flags() -> set[str]:
    text = README.read_text()
    table = text.split("| flag | meaning |", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`(--[a-z][a-z0-9-]*)", table))


def test_readme_flag_table_lists_every_flag_of_the_parser():
    flags = {s for a in parser()._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    documented = _readme_flags()
    assert not flags - documented, f"flags missing from the README table: {sorted(flags - documented)}"
    assert not documented - flags, f"README table lists flags the parser lacks: {sorted(documented - flags)}"


def test_help_goes_to_stdout_and_lists_new_flags(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--worker-timeout", "--quiet", "--verbose", "--version"):
        assert flag in text


def test_a_partial_download_is_one_line_and_missing_rows_keep_their_path(tmp_path):
    from pipeline.run.lifecycle import manifest_summary
    from pipeline.sources.adapters import DatasetSpec
    from pipeline.demo import make_demo_dataset
    from pipeline.core.findings import CHEXNET_FINDINGS
    from pipeline.sources.manifest import build_manifest
    from pipeline.run.scoring import ScoreConfig

    root = make_demo_dataset(tmp_path / "ChestX-ray14", n=20, size=64, seed=1)
    gone = sorted(root.rglob("*.png"))[:5]
    for p in gone:
        p.unlink()
    cfg = ScoreConfig.of(datasets=(f"nih:{root}",), out=str(tmp_path / "out"), checkpoint="random:0")
    result = build_manifest([DatasetSpec.parse(d) for d in cfg.data.datasets], CHEXNET_FINDINGS)
    lines = manifest_summary(result, cfg)
    assert lines[0] == f"nih: 15 of 20 listed films found under {root} (the 5 others are missing_file rows in manifest_issues.parquet)"
    assert lines[1] == "manifest: 15 images; no other metadata issues"
    missing = result.issues.to_pandas()
    assert sorted(missing.path.str.rsplit("/", n=1).str[-1]) == sorted(p.name for p in gone)
    assert all(p.startswith(str(root)) for p in missing.path)


def test_torch_messages_reach_the_user_without_escape_codes(tmp_path, tiny_nih, capsys):
    import torch

    from jobs.score_dataset import main
    from pipeline.inference.tiny_net import TinyCAMNet

    whole = tmp_path / "whole_model.pt"
    torch.save(TinyCAMNet(14), whole)  # a pickled whole model: refused, with torch's (bold-coded) detail
    try:
        torch.load(whole, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raw = str(e)
    out = tmp_path / "out"
    assert main(["--dataset", f"nih:{tiny_nih}", "--checkpoint", str(whole), "--arch", TINY_ARCH, "--out", str(out)]) == 2
    err = capsys.readouterr().err  # refused from the file's header, before torch reads it
    assert "convert_checkpoint --trust-pickle" in err and "pipeline.inference.tiny_net.TinyCAMNet" in err
    assert not out.exists()
    # torch's own refusal (the loader behind the header check) reaches the user without its codes too
    from pipeline.core.errors import UnsafeCheckpointError
    from pipeline.inference.checkpoint import read_state_dict

    with pytest.raises(UnsafeCheckpointError) as e:
        read_state_dict(str(whole))
    assert "Weights only load failed" in plain(e.value) and "\x1b[" not in plain(e.value), "escape codes reached the user"
    assert "\x1b[" in raw or "Weights only" in raw  # torch's own text (with or without codes, by version)


def test_a_taken_dashboard_port_gives_no_warning():
    import socket
    import warnings

    from pipeline.run.cluster import Profile, start_cluster

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8787))  # taken by us, or already by someone else: taken either way
        holder.listen()
    except OSError:
        pass
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            cluster, client = start_cluster(Profile("inprocess", "local", {"n_workers": 1, "processes": False,
                                                                           "dashboard_address": "127.0.0.1:8787"}))
            try:
                assert client.dashboard_link and ":8787/" not in client.dashboard_link
            finally:
                client.close()
                cluster.close()
        assert not [w for w in seen if "already in use" in str(w.message)]
    finally:
        holder.close()


def test_one_run_reads_the_profiles_file_once(tmp_path, tiny_nih, tiny_ckpt, monkeypatch, capsys):
    """The driver resolves the cluster profile once and hands it to the checks, the run and the cluster
    start (pipeline.run.cluster.profile_for): every open of --cluster-file in one whole run is counted."""
    import builtins

    from jobs.score_dataset import main

    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("profiles:\n  mine:\n    type: local\n    n_workers: 1\n    threads_per_worker: 2\n"
                        "    processes: false\n    dashboard_address: null\n")
    reads, real_open = [], builtins.open

    def counting_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(profiles):
            reads.append(file)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", counting_open)
    out = tmp_path / "out"
    rc = main(["--dataset", f"nih:{tiny_nih}", "--checkpoint", tiny_ckpt, "--arch", TINY_ARCH, "--out", str(out), "--limit", "8",
               "--shard-size", "8", "--decode-workers", "0", "--cluster", "mine", "--cluster-file", str(profiles), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "scored 8" in capsys.readouterr().out  # a whole run: its shards went through the profile's cluster
    assert len(reads) == 1


@pytest.fixture
def restored_loggers():
    """setup_logging configures process-wide loggers: put them back as they were."""
    import logging

    from jobs._common import PROGRESS, TREES

    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in (*TREES, *PROGRESS)}
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers


@pytest.mark.parametrize("flag, shown", [
    ([], ["cluster local: starting", "demo: building", "a decode process hung"]),
    (["--quiet"], ["a decode process hung"]),
    (["--verbose"], ["INFO pipeline.run.lifecycle: cluster local: starting", "INFO jobs.score_dataset: demo: building",
                     "INFO pipeline.worker.score_shard: shard 3: 8 of 8", "WARNING pipeline.worker.decode_pool: a decode process hung",
                     "DEBUG pipeline.run.cluster: worker warm-up"]),
])
def test_one_logger_tree_prints_the_progress_lines_and_hides_the_detail(flag, shown, capsys, restored_loggers):
    import logging

    from jobs._common import setup_logging

    setup_logging(parser().parse_args(flag))
    logging.getLogger("pipeline.run.lifecycle").info("cluster local: starting")
    logging.getLogger("jobs.score_dataset").info("demo: building")
    logging.getLogger("pipeline.worker.score_shard").info("shard 3: 8 of 8")  # an in-process worker's detail
    logging.getLogger("pipeline.worker.decode_pool").warning("a decode process hung")
    logging.getLogger("pipeline.run.cluster").debug("worker warm-up")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(shown) and all(line.startswith(want) for line, want in zip(lines, shown)), lines
    # --quiet: no progress bar either (the driver asks its logger)
    assert logging.getLogger("pipeline.run.lifecycle").isEnabledFor(logging.INFO) == ("--quiet" not in flag)


def test_every_module_logs_under_its_own_name():
    names = set()
    for folder in ("pipeline", "jobs"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"logging\.getLogger\(([^)]*)\)", path.read_text()))
    # __name__, the root (its error catcher), loggers looked up by a variable, and the job run as __main__
    assert names <= {"__name__", "", "name", '"jobs.score_dataset"'}, names
