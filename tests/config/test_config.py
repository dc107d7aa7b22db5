"""One configuration: YAML + flags, defaults written once, typed choices, registries, the saved form."""

from __future__ import annotations

import json
from typing import get_args

import pytest
import yaml

from pipeline.core.errors import ConfigError
from pipeline.config.run_config import FLAT_KEYS, SECTIONS, ScoreConfig, load_config, resolve

from tests.conftest import TINY_ARCH


def _score_args(argv):
    from jobs.score_dataset import parser

    return parser().parse_args(argv)


def _write(tmp_path, doc, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return str(path)


# ---------------------------------------------------------------- YAML file + flags
def test_yaml_file_then_flags_override_it_and_flags_not_given_keep_the_file(tmp_path):
    from jobs.score_dataset import config_from_args

    path = _write(tmp_path, {
        "data": {"datasets": ["nih:/data/a", "b=manifest:/data/b.csv"], "views": "all"},
        "model": {"checkpoint": "random:3", "arch": "tiny", "precision": "bf16"},
        "compute": {"shard_size": 256, "batch_size": 8, "device": "cpu"},
        "cluster": {"profile": "inprocess"},
        "output": {"out": "memory://o", "max_failed_fraction": 0.2},
        "aggregate": {"identifiability": True, "min_n": 5},
    })
    cfg = config_from_args(_score_args(["--config", path, "--shard-size", "64", "--dataset", "nih:/elsewhere", "--views", "AP,PA"]))
    assert cfg.compute.shard_size == 64  # the flag wins
    assert cfg.data.datasets == ("nih:/elsewhere",)  # a repeatable flag replaces the file's list
    assert cfg.data.views == ("AP", "PA")
    assert cfg.compute.batch_size == 8 and cfg.compute.device == "cpu"  # not given: the file's
    assert cfg.model.precision == "bf16" and cfg.model.arch == "tiny" and cfg.model.checkpoint == "random:3"
    assert cfg.cluster.profile == "inprocess" and cfg.output.out == "memory://o" and cfg.output.max_failed_fraction == 0.2
    assert cfg.aggregate.identifiability and cfg.aggregate.min_n == 5
    assert cfg.compute.cache == ScoreConfig().compute.cache  # in neither: the default
    # a store_true flag overrides a file's false
    off = _write(tmp_path, {"aggregate": {"identifiability": False}, "output": {"out": "o"}}, "off.yaml")
    assert load_config(off, {"identifiability": True}).aggregate.identifiability


def test_the_aggregate_job_reads_out_and_its_section_from_the_same_file(tmp_path):
    from jobs._common import job_config
    from jobs.aggregate import config_from_args, parser

    path = _write(tmp_path, {"output": {"out": "/r", "storage_options": {"anon": True}},
                             "aggregate": {"by": ["site"], "targets": ["site", "sex"], "min_n": 7}})
    out, agg = config_from_args(parser().parse_args(["--config", path, "--min-n", "9"]))
    assert out.url == "/r" and out.options == {"anon": True}  # the file's storage options travel with the folder
    assert agg.by == ("site",) and agg.targets == ("site", "sex") and agg.min_n == 9
    with pytest.raises(ConfigError, match="--out is required"):
        config_from_args(parser().parse_args([]))
    assert job_config(parser().parse_args(["--out", "x"])).aggregate == ScoreConfig().aggregate


@pytest.mark.parametrize("doc, message", [
    ({"compute": {"shard_sise": 4}}, "unknown key compute.shard_sise (did you mean 'shard_size'?)"),
    ({"computer": {}}, "unknown section 'computer'"),
    ({"model": "densenet121"}, "section 'model' must be a mapping"),
    ("- a\n- b\n", "must hold a mapping of sections"),
    ("data: [unclosed\n", "is not valid YAML"),
    ({"compute": {"shard_size": "big"}}, "--shard-size (compute.shard_size) must be an integer, got 'big'"),
    ({"output": {"verify": "yes"}}, "--verify (output.verify) must be true or false"),
])
def test_file_errors_name_the_key(tmp_path, doc, message):
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)


def test_missing_config_file_is_a_config_error_exit_2(tmp_path, capsys):
    from jobs.score_dataset import main

    assert main(["--config", str(tmp_path / "absent.yaml")]) == 2
    assert "--config" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- one source of defaults
def test_no_flags_give_exactly_the_configuration_defaults():
    from jobs._common import job_config

    assert job_config(_score_args([])) == ScoreConfig()
    assert _score_args([]).__dict__.keys() <= {"config"}  # no flag carries a default of its own


def test_every_layer_default_is_the_configurations():
    from pipeline.analysis.settings import DEFAULT_BY, DEFAULT_TARGETS, AggregateConfig
    from pipeline.analysis.identifiability import ProbeConfig
    from pipeline.analysis.strata import DEFAULT_BY as STRATA_BY
    from pipeline.inference.model import ModelSpec
    from pipeline.inference.precision import PRECISIONS
    from pipeline.inference.preprocess_config import HIGH_BIT_DEPTH_MODES, PreprocessConfig
    from pipeline.io.reads import ReadLimits
    from pipeline.worker.runspec import RunSpec
    from pipeline.sources.source_base import UNCERTAIN_MODES, SourceOptions

    D = ScoreConfig()
    spec = RunSpec(out="o", model=ModelSpec(), model_version="v", baselines=())
    assert (spec.device, spec.batch_size, spec.shard_size, spec.decode_workers, spec.precision) == (
        D.compute.device, D.compute.batch_size, D.compute.shard_size, D.compute.decode_workers, D.model.precision)
    assert spec.read_limits == D.read_limits() and spec.preprocess == D.images.preprocess() == PreprocessConfig()
    assert D.read_limits() == ReadLimits() and D.source_options() == SourceOptions()
    assert ModelSpec().arch == D.model.arch and ModelSpec().findings == D.model.findings
    assert D.aggregate == AggregateConfig() and D.aggregate.targets == ProbeConfig().targets == DEFAULT_TARGETS
    assert D.aggregate.by == DEFAULT_BY == STRATA_BY
    # the typed choices are the layers' own tuples
    hints = {name: __import__("typing").get_type_hints(cls) for name, cls in SECTIONS.items()}
    assert get_args(hints["model"]["precision"]) == PRECISIONS
    assert get_args(hints["images"]["high_bit_depth"]) == HIGH_BIT_DEPTH_MODES
    assert get_args(hints["data"]["uncertain"]) == UNCERTAIN_MODES


def test_the_help_quotes_the_configuration_defaults():
    from jobs.score_dataset import parser

    text = " ".join(parser().format_help().split())
    D = ScoreConfig()
    for flag, value in (("--shard-size", D.compute.shard_size), ("--batch-size", D.compute.batch_size),
                        ("--max-failed-fraction", D.output.max_failed_fraction), ("--read-retries", D.images.read_retries)):
        assert f"(default {value})" in text.split(flag, 2)[2][:400], flag


def test_the_job_s_flags_take_their_name_type_and_choices_from_the_configuration_fields():
    from typing import Literal, get_origin

    from jobs.aggregate import parser as aggregate_parser
    from pipeline.config.run_config import INPUT_KEYS, flag_name, input_type, score_flags

    for flag in score_flags():
        if flag.key in ("storage_options", "input_options"):
            continue  # their own action (tests/config/test_storage_options.py)
        hint, default = input_type(flag.key)
        if hint is bool:  # store_true, or --no-KEY where the default is true
            argv, want = [f"--no-{flag.key.replace('_', '-')}" if default else flag_name(flag.key)], not default
        elif get_origin(hint) is Literal:
            argv, want = [flag_name(flag.key), get_args(hint)[-1]], get_args(hint)[-1]
        elif get_origin(hint) is tuple:
            argv, want = [flag_name(flag.key), "a,b"], ["a,b"] if flag.repeat else ("a", "b")
        else:
            argv, want = [flag_name(flag.key), "3"], hint("3")
        got = vars(_score_args(argv))
        assert got == {flag.key: want} and type(got[flag.key]) is type(want), (flag.key, got)
    with pytest.raises(SystemExit):  # a choice outside the field's Literal
        _score_args(["--precision", "fp16"])
    # every key is a flag of the scoring or the aggregate job, but these (set in --config's file only)
    flags = {f.key for f in score_flags()} | {a.dest for a in aggregate_parser()._actions}
    assert set(INPUT_KEYS) - flags == {"n_boot", "cell_probes", "dataset_options"}


# ---------------------------------------------------------------- typed choices
@pytest.mark.parametrize("flat, message", [
    ({"precision": "fp16"}, "--precision (model.precision) must be one of fp32, tf32, bf16, got 'fp16'"),
    ({"high_bit_depth": "stretch"}, "--high-bit-depth (images.high_bit_depth) must be one of clip, rescale"),
    ({"uncertain": "maybe"}, "--uncertain (data.uncertain) must be one of zeros, ones, ignore"),
    ({"device": "tpu"}, "--device 'tpu': use auto, cpu, cuda or cuda:N"),
    ({"arch": "resnet"}, "registered architectures are densenet121, tiny"),
    ({"shard_size": 0}, "--shard-size"),
    ({"max_failed_fraction": 2}, "--max-failed-fraction must be between 0 and 1"),
    ({"checkpoint": "random:x"}, "random:SEED"),
    ({"findings": ("A", "A")}, "--findings must name each output once"),
    ({"anatomy_mask": [[1] * 7] * 6}, "--anatomy-mask"),
    ({"shard_sise": 4}, "unknown key 'shard_sise' (did you mean 'shard_size'?)"),
])
def test_invalid_values_are_config_errors_naming_the_flag_and_choices(flat, message):
    with pytest.raises(ConfigError) as e:
        ScoreConfig.of(**flat)
    assert message in str(e.value)


def test_the_configuration_is_frozen_and_sections_are_checked():
    import dataclasses

    cfg = ScoreConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.compute.shard_size = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="must be one of fp32"):
        ScoreConfig(model=type(cfg.model)(precision="half"))  # built in Python: checked the same way


# ---------------------------------------------------------------- deprecated keys
def test_decode_threads_is_resolved_in_the_configuration_and_noted_once(tmp_path, monkeypatch, caplog):
    import dataclasses

    import pipeline.config.run_config as rc
    from jobs._common import job_config
    from pipeline.worker.runspec import RunSpec

    monkeypatch.setattr(rc, "_NOTED", set())  # a fresh process
    assert job_config(_score_args(["--decode-threads", "3"])).compute.decode_workers == 3  # the flag
    assert load_config(_write(tmp_path, {"compute": {"decode_threads": 2}})).compute.decode_workers == 2  # the file
    assert ScoreConfig.of(decode_threads=4).compute.decode_workers == 4  # Python, and run.json's config of older runs
    notes = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert notes == ["--decode-threads (compute.decode_threads) is deprecated: it sets --decode-workers (compute.decode_workers); "
                     "use that instead"]
    # within a layer the new key wins; a later layer's alias replaces an earlier layer's value, as every key does
    assert ScoreConfig.of(decode_threads=4, decode_workers=0).compute.decode_workers == 0
    both = _write(tmp_path, {"compute": {"decode_workers": 1}}, "both.yaml")
    assert job_config(_score_args(["--config", both, "--decode-threads", "5"])).compute.decode_workers == 5
    # it is no field past the configuration: not saved, not printed, not in the shard spec
    cfg = ScoreConfig.of(decode_threads=4)
    assert "decode_threads" not in cfg.flat() and "decode_threads" not in cfg.to_dict()["compute"]
    assert "decode_threads" not in {f.name for f in dataclasses.fields(RunSpec)}
    with pytest.raises(ConfigError, match="--decode-threads must be at least 1"):
        ScoreConfig.of(decode_threads=0)
    with pytest.raises(ConfigError, match=r"--decode-threads \(compute.decode_threads\) must be an integer"):
        load_config(_write(tmp_path, {"compute": {"decode_threads": "many"}}, "bad.yaml"))


# ---------------------------------------------------------------- registries
def test_unknown_adapter_lists_the_registered_ones_and_loading_goes_through_the_registry(tmp_path):
    import pandas as pd

    from pipeline.core.findings import CHEXNET_FINDINGS
    from pipeline.sources.adapters import load_dataset
    from pipeline.sources.manifest import build_manifest
    from pipeline.sources.source_base import ADAPTERS, BASE, DatasetSpec, RawDataset, SourceOptions

    with pytest.raises(ConfigError) as e:
        DatasetSpec.parse("bogus:/x")
    assert all(name in str(e.value) for name in ("nih", "chexpert", "mimic", "padchest", "manifest"))
    assert set(ADAPTERS) == {"nih", "chexpert", "mimic", "padchest", "manifest"}
    assert all(callable(ADAPTERS[name]) for name in ADAPTERS)  # every table entry imports

    seen = []
    img = tmp_path / "a.png"
    img.write_bytes(b"x")

    def load_test(spec, findings, options):
        seen.append((spec.location, options.uncertain))
        rec = dict(image_id="a", path=str(img), patient_id="p", site=spec.name, view_position="PA", sex="F", age="40",
                   split=None, extra=None, **{f: False for f in findings})
        return RawDataset(pd.DataFrame([rec], columns=BASE + ["extra", *findings]), [], None, roots=(str(tmp_path),), check_exists=True)

    ADAPTERS.register("unit-test", load_test)
    try:
        spec = DatasetSpec.parse(f"unit-test:{tmp_path}")
        assert load_dataset(spec, CHEXNET_FINDINGS, SourceOptions(uncertain="ones")).records.image_id.tolist() == ["a"]
        result = build_manifest([spec], CHEXNET_FINDINGS)
        assert result.manifest.column("image_id").to_pylist() == ["a"]
        assert seen == [(str(tmp_path), "ones"), (str(tmp_path), "zeros")]
    finally:
        ADAPTERS.unregister("unit-test")
    with pytest.raises(ConfigError, match="registered adapters: nih"):
        DatasetSpec.parse(f"unit-test:{tmp_path}")


def test_unknown_arch_lists_the_registered_ones_and_the_benchmark_takes_the_same_names(capsys):
    from pipeline.inference.architectures import ARCHITECTURES, arch_profile, build_arch
    from pipeline.inference.model import ModelSpec, load_model

    with pytest.raises(ConfigError, match="registered architectures are densenet121, tiny"):
        build_arch("resnet", 14)
    a = load_model(ModelSpec("tiny", "random:0"))
    b = load_model(ModelSpec(TINY_ARCH, "random:0"))
    assert a.version == b.version  # the registered name builds the same network as its module:callable
    from jobs.benchmark import main as benchmark_main

    with pytest.raises(SystemExit):
        benchmark_main(["--arch", "resnet"])
    err = capsys.readouterr().err
    assert all(repr(name) in err for name in ARCHITECTURES if not arch_profile(name).targets)
    assert "xrv:" not in err  # its baselines are CheXNet's (README, "torchxrayvision's models")


# ---------------------------------------------------------------- the saved form
def test_flat_form_round_trips_and_keeps_the_keys_run_json_always_had():
    cfg = ScoreConfig.of(datasets=("nih:/d", "x=manifest:/m.csv"), out="s3://b/o", checkpoint="/m.safetensors", arch="tiny",
                         findings=("A", "B"), baselines="from-labels", cluster="slurm", cluster_file="/etc/c.yaml",
                         shard_size=512, limit=10, device="cuda:1", high_bit_depth="rescale", precision="tf32", cache="none",
                         views=("AP", "PA"), uncertain="ignore", identifiability=True, verify=True, worker_timeout=60,
                         read_retries=0, allow_roots=("/x",), anatomy_mask=[[1] * 7] * 7, targets=("site",))
    flat = json.loads(json.dumps(cfg.flat()))  # as run.json stores it
    assert ScoreConfig.from_flat(flat) == cfg
    old_keys = {"datasets", "out", "checkpoint", "arch", "findings", "baselines", "metadata", "cluster", "cluster_file", "shard_size",
                "batch_size", "limit", "device", "high_bit_depth", "decode_workers", "precision", "cache", "views",
                "site_column", "uncertain", "identifiability", "verify", "max_failed_fraction", "worker_timeout", "max_image_bytes",
                "max_image_pixels", "max_aspect_ratio", "read_timeout", "read_retries", "allow_roots", "storage_options"}
    assert old_keys <= set(flat) == set(FLAT_KEYS)
    # the nested form through a YAML file
    assert load_config(_write_tmp(yaml.safe_dump(cfg.to_dict()))) == cfg


def _write_tmp(text):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    return f.name


def test_storage_options_are_saved_as_keys_only():
    cfg = ScoreConfig.of(out="s3://b", storage_options={"key": "AKIA", "secret": "s3cr3t"})
    assert cfg.flat()["storage_options"] == ["key", "secret"] and "s3cr3t" not in json.dumps(cfg.flat())
    assert "storage_options" not in cfg.to_dict()["output"]
    assert ScoreConfig.from_flat(cfg.flat()).output.storage_options == {}


def test_a_prepared_run_saves_the_resolved_configuration_and_it_round_trips(tiny_nih, tiny_ckpt, tmp_path):
    from pipeline.core.findings import REFERENCE_BASELINES
    from pipeline.run.scoring import prepare_run

    out = tmp_path / "out"
    cfg = ScoreConfig.of(datasets=(f"nih:{tiny_nih}",), out=str(out), checkpoint=tiny_ckpt, arch=TINY_ARCH, shard_size=16, device="cpu")
    prep = prepare_run(cfg)
    with open(f"{prep.spec.run_url}/run.json") as f:
        run = json.load(f)
    assert ScoreConfig.from_flat(run["config"]) == cfg
    # and as a file next to run.json that --config reads back to the same configuration
    assert load_config(f"{prep.spec.run_url}/config.yaml") == cfg
    assert run["resolved"] == {"baselines": dict(REFERENCE_BASELINES), "cache": f"{out}/cache", "device": "cpu"}
    # the shard spec is derived from the resolved configuration, once
    assert prep.spec.baselines == resolve(cfg).baselines and prep.spec.cache_url.startswith(f"{out}/cache/")
    assert (prep.spec.shard_size, prep.spec.device, prep.spec.batch_size) == (16, "cpu", cfg.compute.batch_size)
    # the model a local cluster's workers load as they come up is the one the shards name (one cache
    # entry); workers of a shared scheduler or a batch system load it in their first shard
    from pipeline.run.cluster import Profile
    from pipeline.run.lifecycle import warm_args

    assert warm_args(cfg, Profile("local", "local", {}))[-1] == (prep.spec.model, prep.spec.device)
    assert warm_args(cfg, Profile("hpc", "slurm", {}))[-1] is None and warm_args(cfg, Profile("a", "address", {}))[-1] is None


def test_print_config_writes_a_file_that_config_reads_back(tmp_path, capsys):
    from jobs.score_dataset import main

    flags = ["--dataset", "nih:/data/a", "--checkpoint", "random:1", "--out", str(tmp_path / "o"), "--shard-size", "64",
             "--views", "all", "--identifiability", "--cluster", "inprocess"]
    assert main([*flags, "--print-config"]) == 0
    path = _write(tmp_path, capsys.readouterr().out, "printed.yaml")
    cfg = load_config(path)
    assert cfg == ScoreConfig.of(datasets=("nih:/data/a",), checkpoint="random:1", out=str(tmp_path / "o"), shard_size=64,
                                 views=("all",), identifiability=True, cluster="inprocess")
    assert not (tmp_path / "o").exists()  # printing runs nothing
