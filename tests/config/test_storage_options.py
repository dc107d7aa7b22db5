"""--storage-option KEY=VALUE on every job that takes --out, merged over output.storage_options of
--config; jobs.runs reads --config like the other jobs; storage option values (credentials) never
reach printed text, reprs (Dask quotes task arguments in its logs), run.json or config.yaml."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import yaml

from jobs import aggregate, drift, report, runs, score_dataset
from jobs._common import job_config, out_from_args, parse_storage_option
from pipeline.core.errors import ConfigError
from pipeline.core.redact import redact_argv
from pipeline.config.run_config import ScoreConfig, load_config
from pipeline.store.layout import OutputStore

from tests import guarded_fs

SECRET = "s3cr3t-VALUE-42"
JOBS = {"score_dataset": score_dataset, "aggregate": aggregate, "drift": drift, "report": report, "runs": runs}


@pytest.fixture
def guarded():
    with guarded_fs.mounted() as store:
        yield store


def _config_file(tmp_path, output: dict) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output": output}))
    return str(path)


@pytest.mark.parametrize("text, expected", [
    ("anon=true", ("anon", True)),
    ("endpoint_url=https://minio.example.org:9000", ("endpoint_url", "https://minio.example.org:9000")),
    ("max_concurrency=8", ("max_concurrency", 8)),
    ('key="0123"', ("key", "0123")),  # JSON quotes keep a numeric-looking value a string
    ("key=0123", ("key", "0123")),  # not JSON (leading zero): the string
    ('client_kwargs={"region_name": "eu-west-1"}', ("client_kwargs", {"region_name": "eu-west-1"})),
    ("token=a=b", ("token", "a=b")),  # only the first '=' splits
    ("profile=", ("profile", "")),
])
def test_a_storage_option_value_is_json_when_it_parses_else_a_string(text, expected):
    assert parse_storage_option(text) == expected


@pytest.mark.parametrize("text", [SECRET, f"={SECRET}", f"not a key={SECRET}"])
def test_a_malformed_storage_option_is_refused_without_quoting_it(text, capsys):
    with pytest.raises(ConfigError) as e:
        parse_storage_option(text)
    assert SECRET not in str(e.value) and "KEY=VALUE" in str(e.value)
    with pytest.raises(SystemExit) as exit_:
        runs.parser().parse_args(["--out", "x", "--storage-option", text])
    assert exit_.value.code == 2 and SECRET not in capsys.readouterr().err


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_with_out_merges_the_flags_over_the_files_storage_options(job, tmp_path):
    path = _config_file(tmp_path, {"out": "s3://bucket/audit", "storage_options": {"anon": False, "endpoint_url": "https://a"}})
    args = JOBS[job].parser().parse_args(["--config", path, "--storage-option", "endpoint_url=https://b",
                                          "--storage-option", "anon=true", "--storage-option", 'client_kwargs={"region_name": "eu"}'])
    want = {"anon": True, "endpoint_url": "https://b", "client_kwargs": {"region_name": "eu"}}
    assert job_config(args).output.storage_options == want  # key by key: the flag's value wins, the file's other keys stay
    if job != "score_dataset":
        store = out_from_args(args)
        assert store.url == "s3://bucket/audit" and store.options == want
    # without --config, the flags alone; without either, none
    assert job_config(JOBS[job].parser().parse_args(["--out", "o", "--storage-option", "anon=true"])).output.storage_options == {"anon": True}
    assert job_config(JOBS[job].parser().parse_args(["--out", "o"])).output.storage_options == {}


def test_load_config_merges_storage_options_and_replaces_other_keys(tmp_path):
    path = _config_file(tmp_path, {"out": "o", "storage_options": {"a": 1, "b": 2}, "max_failed_fraction": 0.5})
    cfg = load_config(path, {"storage_options": {"b": 3}, "max_failed_fraction": 0.1})
    assert dict(cfg.output.storage_options) == {"a": 1, "b": 3} and cfg.output.max_failed_fraction == 0.1


def test_runs_takes_out_and_storage_options_from_config_and_flags(guarded, tmp_path, capsys):
    guarded.write_json(guarded.latest, OutputStore.latest_entry("v1", None))
    # guarded:// refuses to open without its token: each way of giving it must reach the store
    path = _config_file(tmp_path, {"out": guarded.url, "storage_options": guarded_fs.OPTIONS})
    assert runs.main(["--config", path, "--latest"]) == 0
    assert capsys.readouterr().out.strip() == guarded.run_dir("v1")
    assert runs.main(["--out", guarded.url, "--storage-option", f"token={guarded_fs.TOKEN}", "--latest"]) == 0
    assert capsys.readouterr().out.strip() == guarded.run_dir("v1")
    bare = _config_file(tmp_path, {"out": guarded.url})
    assert runs.main(["--config", bare, "--storage-option", f"token={guarded_fs.TOKEN}", "--unlock"]) == 0
    assert "no lock under guarded://bucket/out" in capsys.readouterr().out
    # without it: the storage's refusal, in one line that says where credentials go, exit 2
    assert runs.main(["--config", bare, "--latest"]) == 2
    err = capsys.readouterr().err
    assert "permission denied" in err and "options were dropped" in err and "--storage-option" in err
    assert "Traceback" not in err and guarded_fs.TOKEN not in err
    # --out is required, here or in the file
    assert runs.main(["--latest"]) == 2
    assert "--out is required (or output.out in --config)" in capsys.readouterr().err


def test_storage_option_values_never_reach_reprs_saved_files_or_messages():
    from pipeline.run.scoring import resolved_config_yaml

    cfg = load_config(None, {"out": "s3://bucket/audit", "storage_options": {"secret": SECRET, "endpoint_url": "https://minio"}})
    store = cfg.output.store()
    assert store.options["secret"] == SECRET  # the value still opens the store ...
    for text in (repr(cfg), str(cfg), repr(store), str(store), repr(store.storage_options), repr(cfg.output.storage_options),
                 repr(pickle.loads(pickle.dumps(store))),  # ... and a task argument shipped to a worker stays masked
                 json.dumps(cfg.flat()), yaml.safe_dump(cfg.to_dict()), resolved_config_yaml(cfg).decode()):
        assert SECRET not in text
    assert pickle.loads(pickle.dumps(store)) == store and hash(store.storage_options) == hash(tuple(store.storage_options))
    from dask.base import tokenize

    assert tokenize(pickle.loads(pickle.dumps(store.storage_options))) == tokenize(store.storage_options)  # deterministic
    saved = resolved_config_yaml(cfg).decode()
    assert "# Storage options endpoint_url, secret are not written here" in saved  # the keys, to be given again
    assert load_config_text(saved).output.storage_options == {}
    # a wrongly typed value in a file is named by its type, never quoted
    with pytest.raises(ConfigError) as e:
        ScoreConfig.from_dict({"output": {"storage_options": f"secret={SECRET}"}})
    assert "--storage-option (output.storage_options) must be a mapping, got str" in str(e.value) and SECRET not in str(e.value)


def load_config_text(text: str) -> ScoreConfig:
    return ScoreConfig.from_dict(yaml.safe_load(text))


@pytest.mark.parametrize("argv", [
    ["--storage-option", f"secret={SECRET}"],
    [f"--storage-option=secret={SECRET}"],
    ["--storage-opt", f"secret={SECRET}"],  # argparse accepts unambiguous prefixes
    ["--storage-option", SECRET],
])
def test_the_rerun_command_line_in_messages_masks_storage_option_values(argv):
    shown = " ".join(redact_argv(["--out", "s3://user:pw@bucket/o", *argv, "--shard-size", "64"]))
    assert SECRET not in shown and "pw" not in shown
    assert shown.startswith("--out s3://REDACTED@bucket/o --storage-") and shown.endswith("--shard-size 64")


def test_print_config_leaves_storage_option_values_out_and_names_their_keys(tmp_path, capsys):
    flags = ["--dataset", "nih:/data/a", "--checkpoint", "random:1", "--out", "s3://bucket/o",
             "--storage-option", f"secret={SECRET}", "--storage-option", "anon=false"]
    assert score_dataset.main([*flags, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert SECRET not in printed and "# Storage options anon, secret are not written here" in printed
    assert load_config_text(printed) == ScoreConfig.of(datasets=("nih:/data/a",), checkpoint="random:1", out="s3://bucket/o")


@pytest.mark.parametrize("text, line", [
    (f"output:\n  storage_options: {{secret: {SECRET}\n", 3),
    (f"output:\n  storage_options: {{secret: {SECRET}}}}}\n", 2),
    (f"output:\n  out: x\n  storage_options\n  secret: \"{SECRET}\n", 4),
])
def test_a_broken_config_file_is_located_without_quoting_its_lines(tmp_path, text, line):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert f"is not valid YAML at line {line}," in str(e.value) and SECRET not in str(e.value)


def test_a_prepared_run_on_a_store_that_needs_a_token_writes_no_token(guarded, tiny_nih, tiny_ckpt):
    """The files prepare writes (manifest, run.json, config.yaml, the Zarr attributes) on a store
    that only opens with its token: the run reached them with the token, and none holds it."""
    from pipeline.run.scoring import prepare_run

    from tests.conftest import TINY_ARCH

    cfg = load_config(None, {"datasets": (f"nih:{tiny_nih}",), "out": guarded.url, "checkpoint": tiny_ckpt, "arch": TINY_ARCH,
                             "shard_size": 16, "device": "cpu", "cache": "none", "storage_options": guarded_fs.OPTIONS})
    prep = prepare_run(cfg)
    fs, root = guarded.fs()
    written = [p for p in fs.find(root) if fs.isfile(p)]
    mv = prep.spec.model_version
    assert {guarded.fs(guarded.run_json(mv))[1], guarded.fs(guarded.resolved_config(mv))[1], guarded.fs(guarded.manifest)[1]} <= set(written)
    assert any(p.endswith("zarr.json") for p in written)
    for p in written:
        assert guarded_fs.TOKEN.encode() not in fs.cat_file(p), p
    assert json.loads(fs.cat_file(guarded.fs(guarded.run_json(mv))[1]))["config"]["storage_options"] == ["token"]
    assert guarded_fs.TOKEN not in repr(prep.spec)  # what Dask would quote in a worker's log


# ---- inputs and outputs with their own options --------------------------------------------------

RUN_FLAGS = ["--cluster", "inprocess", "--shard-size", "16", "--batch-size", "8", "--limit", "32", "--device", "cpu",
             "--decode-workers", "0",  # guardedin:// lives in this process's memory: decode here, not in decode processes
             "--no-report", "--arch", "pipeline.inference.tiny_net:tiny_cam_net"]


def _cluster_file() -> list[str]:
    from pathlib import Path

    return ["--cluster-file", str(Path(__file__).resolve().parents[2] / "cluster.yaml")]


@pytest.fixture(scope="module")
def local_run(tiny_nih, tiny_ckpt, tmp_path_factory):
    """The same run with everything on local disk: what the guarded runs must equal."""
    out = tmp_path_factory.mktemp("local") / "out"
    assert score_dataset.main(["--dataset", f"nih:{tiny_nih}", "--checkpoint", tiny_ckpt, "--out", str(out), *RUN_FLAGS, *_cluster_file()]) == 0
    store = OutputStore(str(out))
    return store, store.read_json(store.latest)["model_version"]


@pytest.fixture
def inputs_on_guardedin(guarded, tiny_nih, tiny_ckpt):
    """The tiny NIH dataset and the checkpoint on guardedin://bucket/in (opened with its own token only)."""
    fs = guarded_fs.input_fs()
    fs.put(str(tiny_nih), "/bucket/in/nih", recursive=True)
    fs.put(tiny_ckpt, "/bucket/in/tiny.safetensors")
    return {p: fs.cat_file(p) for p in fs.find("/bucket/in")}


def _outputs(store: OutputStore, mv: str):
    from pipeline.store.predictions import load_predictions

    preds = load_predictions(store, mv).sort_values("row").reset_index(drop=True)
    maps = store.open_maps(store.maps(mv))
    return preds, {name: maps[name][:] for name in ("cam", "cell_logit", "embedding")}


@pytest.mark.parametrize("how", ["flag", "config", "per-dataset"])
def test_inputs_and_outputs_on_two_stores_each_with_its_own_options(how, guarded, inputs_on_guardedin, local_run, tiny_ckpt, tmp_path, capsys):
    """Films, metadata and checkpoint on guardedin://, --out on guarded://: each refuses the other's
    token, so a run that mixed them fails. Given with --input-option, data.input_options, or the
    dataset's own data.dataset_options (the checkpoint then local), the run completes, equals the same
    run on local disk bit for bit, writes nothing to the inputs and no token anywhere."""
    ckpt = "guardedin://bucket/in/tiny.safetensors"
    flags = ["--dataset", "nih:guardedin:///bucket/in/nih", "--out", guarded.url, "--storage-option", f"token={guarded_fs.TOKEN}"]
    if how == "flag":
        flags += ["--input-option", f"token={guarded_fs.INPUT_TOKEN}"]
    else:
        data = {"input_options": guarded_fs.INPUT_OPTIONS} if how == "config" else {"dataset_options": {"nih": guarded_fs.INPUT_OPTIONS}}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"data": data}))
        flags += ["--config", str(path)]
        ckpt = ckpt if how == "config" else tiny_ckpt  # per dataset: only the dataset's files have the options
    assert score_dataset.main([*flags, "--checkpoint", ckpt, *RUN_FLAGS, *_cluster_file()]) == 0
    printed = capsys.readouterr()
    run = guarded.read_json(guarded.run_json(guarded.read_json(guarded.latest)["model_version"]))
    assert run["status"] == "complete" and run["counts"]["scored"] == 32
    ref_store, ref_mv = local_run
    assert run["model_version"] == ref_mv  # the same weights, read through the input options
    preds, maps = _outputs(guarded, ref_mv)
    ref_preds, ref_maps = _outputs(ref_store, ref_mv)
    assert preds.equals(ref_preds)  # bit-identical
    for name in maps:
        np.testing.assert_array_equal(maps[name], ref_maps[name])
    # the options are keys only in run.json; nothing was written to the inputs; no token anywhere
    assert run["config"]["storage_options"] == ["token"]
    assert run["config"]["input_options" if how != "per-dataset" else "dataset_options"] == (["token"] if how != "per-dataset" else ["nih"])
    fs_in = guarded_fs.input_fs()
    assert {p: fs_in.cat_file(p) for p in fs_in.find("/bucket/in")} == inputs_on_guardedin
    fs_out, root = guarded.fs()
    written = [p for p in fs_out.find(root) if fs_out.isfile(p)]
    assert any(p.endswith("run.json") for p in written) and any("/_shards/" in p for p in written)
    for p in written:
        data = fs_out.cat_file(p)
        assert guarded_fs.TOKEN.encode() not in data and guarded_fs.INPUT_TOKEN.encode() not in data, p
    for text in (printed.out, printed.err):
        assert guarded_fs.TOKEN not in text and guarded_fs.INPUT_TOKEN not in text
    if how == "flag":  # the report's film sheet reads the film through the input options too
        image_id = preds.image_id[0]
        sheets = {}
        for name, store, extra in (("local", ref_store, []), ("guarded", guarded, ["--storage-option", f"token={guarded_fs.TOKEN}"])):
            for opts in ([], ["--input-option", f"token={guarded_fs.INPUT_TOKEN}"]) if name == "guarded" else ([],):
                assert report.main(["--out", store.url, *extra, *opts, "--film", image_id, "--png", str(tmp_path / "f.png")]) == 0
                sheets[(name, bool(opts))] = (tmp_path / "f.png").read_bytes()
        assert sheets[("guarded", True)] == sheets[("local", False)] != sheets[("guarded", False)]  # without them: no film drawn
        # jobs.runs --check --verify reads every film again: with the input options they match their records
        check = ["--out", guarded.url, "--storage-option", f"token={guarded_fs.TOKEN}", "--check", "--verify"]
        assert runs.main([*check, "--input-option", f"token={guarded_fs.INPUT_TOKEN}"]) == 0
        assert runs.main(check) == 1 and "changed since it was scored" in capsys.readouterr().out  # unreadable without them


def test_inputs_that_need_options_fail_clearly_when_only_the_outputs_have_them(guarded, inputs_on_guardedin, capsys):
    """The old shared-options behaviour is gone: --storage-option opens --out only, and the inputs'
    refusal says that their options go in --input-option."""
    flags = ["--dataset", "nih:guardedin:///bucket/in/nih", "--checkpoint", "guardedin://bucket/in/tiny.safetensors",
             "--out", guarded.url, "--storage-option", f"token={guarded_fs.TOKEN}", *RUN_FLAGS, *_cluster_file()]
    assert score_dataset.main(flags) == 2
    err = capsys.readouterr().err
    assert "permission denied" in err and "--input-option" in err and "--storage-option is for --out only" in err
    assert "Traceback" not in err and guarded_fs.TOKEN not in err
    # the output's token given as an input option is refused by the inputs' store too
    assert score_dataset.main([*flags, "--input-option", f"token={guarded_fs.TOKEN}"]) == 2
    err = capsys.readouterr().err
    assert "--input-option" in err and guarded_fs.TOKEN not in err


@pytest.mark.parametrize("typo", ["--storage-optoin", "--input-optoin", "--shard-size", "--s"])
@pytest.mark.parametrize("flag", ["--storage-option", "--input-option"])
def test_usage_errors_never_echo_option_values(flag, typo, capsys):
    """argparse's own errors (an unknown flag, a value of the wrong type, an ambiguous prefix) with a
    secret beside or in them: exit 2, the secret never printed."""
    argv = ["--out", "o", flag, "secret=XYZ-sekrit", typo, "key=XYZ-sekrit-2"] if typo != "--s" else [flag, "secret=XYZ-sekrit", "--s=secret=XYZ-sekrit-2"]
    with pytest.raises(SystemExit) as e:
        score_dataset.parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and "XYZ" not in err


def test_input_options_are_masked_merged_and_never_saved(tmp_path):
    from pipeline.run.scoring import resolved_config_yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"datasets": ["a=nih:s3://films/a"], "input_options": {"anon": False, "key": "k1"},
                                             "dataset_options": {"a": {"secret": SECRET}}}}))
    args = score_dataset.parser().parse_args(["--config", str(path), "--input-option", f"key={SECRET}", "--input-option", "anon=true",
                                              "--checkpoint", "s3://models/m.safetensors"])
    cfg = job_config(args)
    assert cfg.data.input_options == {"anon": True, "key": SECRET}  # the flags over the file, key by key
    assert cfg.output.storage_options == {}  # never the outputs'
    inputs = cfg.inputs()
    assert dict(inputs.options_for("s3://films/a/images/1.png")) == {"secret": SECRET}  # the dataset's own, whole
    assert dict(inputs.options_for("s3://films/b/1.png")) == {"anon": True, "key": SECRET}
    assert dict(cfg.model_spec().storage_options) == {"anon": True, "key": SECRET}  # the checkpoint is an input
    for text in (repr(cfg), repr(inputs), repr(pickle.loads(pickle.dumps(inputs))), json.dumps(cfg.flat()),
                 yaml.safe_dump(cfg.to_dict()), resolved_config_yaml(cfg).decode()):
        assert SECRET not in text
    flat = cfg.flat()
    assert flat["input_options"] == ["anon", "key"] and flat["dataset_options"] == ["a"]
    assert ScoreConfig.from_flat(json.loads(json.dumps(flat))).data.input_options == {}
    saved = resolved_config_yaml(cfg).decode()
    assert "# Input options anon, key are not written here" in saved and "# The options of datasets a are not written" in saved
    with pytest.raises(ConfigError) as e:
        ScoreConfig.from_dict({"data": {"dataset_options": {"a": f"secret={SECRET}"}}})
    assert "data.dataset_options.a must be a mapping" in str(e.value) and SECRET not in str(e.value)
    with pytest.raises(ConfigError) as e:
        ScoreConfig.from_dict({"data": {"input_options": f"secret={SECRET}"}})
    assert "--input-option (data.input_options) must be a mapping, got str" in str(e.value) and SECRET not in str(e.value)


def test_input_options_are_not_part_of_the_runs_identity():
    from pipeline.run.uptodate import identity_config

    a = ScoreConfig.of(out="o", input_options={"key": "1"}, dataset_options={"nih": {"key": "2"}}, storage_options={"x": 1})
    assert identity_config(json.loads(json.dumps(a.flat()))) == identity_config(ScoreConfig.of(out="o").flat())


def test_dataset_options_must_name_a_dataset(tmp_path, tiny_nih, tiny_ckpt):
    from pipeline.run.validate import validate

    cfg = ScoreConfig.of(datasets=(f"nih:{tiny_nih}",), checkpoint=tiny_ckpt, out=str(tmp_path / "o"),
                         dataset_options={"nhi": {"secret": SECRET}})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "data.dataset_options names 'nhi', which is no --dataset" in str(e.value) and SECRET not in str(e.value)
