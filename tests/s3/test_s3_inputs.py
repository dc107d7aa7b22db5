"""Inputs and outputs on a real S3 server, in different buckets under different credentials: films,
metadata CSV, bounding boxes and the checkpoint in `films` (read with --input-option as the
`inputs` identity), every output in `results` (written with --storage-option as the `outputs`
identity). Each identity is refused on the other's bucket, so a run that mixed them up would fail;
this one completes, equals the same run on local disk, and no credential appears in any output
object, log or printed line."""

from __future__ import annotations

import pytest

from jobs.score_dataset import main
from tests.conftest import TINY_ARCH
from tests.s3.compare import assert_same_outputs, objects
from tests.s3.server import INPUT_BUCKET, OUTPUT_BUCKET


def _bbox_list(root) -> bytes:
    """A BBox_List_2017.csv for ten of the films (its format: three trailing empty columns)."""
    ids = [line.split(",", 1)[0] for line in (root / "Data_Entry_2017_v2020.csv").read_text().splitlines()[1:11]]
    rows = [f"{i},{('Atelectasis', 'Effusion')[n % 2]},{10 + n},{20 + n},{40 + n},{30 + n}" for n, i in enumerate(ids)]
    return ("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "\n".join(rows) + "\n").encode()


def test_each_identity_is_refused_on_the_others_bucket(s3_server, prefix):
    for who, own, other in (("inputs", INPUT_BUCKET, OUTPUT_BUCKET), ("outputs", OUTPUT_BUCKET, INPUT_BUCKET)):
        fs = s3_server.fs(who)
        fs.pipe(f"{own}/{prefix}/{who}.txt", b"mine")
        assert fs.cat(f"{own}/{prefix}/{who}.txt") == b"mine"
        s3_server.fs().pipe(f"{other}/{prefix}/theirs.txt", b"theirs")
        with pytest.raises(PermissionError):
            fs.cat(f"{other}/{prefix}/theirs.txt")
        with pytest.raises(PermissionError):
            fs.pipe(f"{other}/{prefix}/{who}.txt", b"x")
        with pytest.raises(PermissionError):
            fs.ls(f"{other}/{prefix}")


def test_inputs_and_outputs_on_s3_with_their_own_credentials(s3_server, prefix, tiny_nih, tiny_ckpt, tmp_path, capsys):
    admin = s3_server.fs()
    data = f"{INPUT_BUCKET}/{prefix}"
    admin.put(str(tiny_nih), f"{data}/ChestX-ray14", recursive=True)
    admin.pipe(f"{data}/ChestX-ray14/BBox_List_2017.csv", _bbox_list(tiny_nih))
    admin.put(tiny_ckpt, f"{data}/tiny.safetensors")
    out = f"s3://{OUTPUT_BUCKET}/{prefix}"
    run = ["--dataset", f"nih:s3://{data}/ChestX-ray14", "--checkpoint", f"s3://{data}/tiny.safetensors", "--arch", TINY_ARCH,
           "--shard-size", "8", "--batch-size", "4", "--cluster", "inprocess", "--cache", "none", "--no-report", "--decode-workers", "0"]
    inputs, outputs = s3_server.flags("inputs", "--input-option"), s3_server.flags("outputs")

    # Each option set reaches only its side: swapped, the run is refused before it writes anything.
    assert main([*run, "--out", out, *s3_server.flags("outputs", "--input-option"), *s3_server.flags("inputs")]) != 0
    assert main([*run, "--out", out, *inputs, *s3_server.flags("inputs")]) != 0
    assert main([*run, "--out", out, *s3_server.flags("outputs", "--input-option"), *outputs]) != 0
    refused = capsys.readouterr()
    assert not admin.glob(f"{OUTPUT_BUCKET}/{prefix}/runs/*/predictions/*.parquet")

    assert main([*run, "--out", out, *inputs, *outputs]) == 0
    assert main([*run, "--out", out, *inputs, *outputs]) == 0  # the rerun: nothing changed
    said = capsys.readouterr()
    assert "nothing changed" in said.out, said.out + said.err[-2000:]
    local = ["--dataset", f"nih:{tiny_nih}", "--checkpoint", tiny_ckpt, *run[4:], "--out", str(tmp_path / "local")]
    assert main(local) == 0
    capsys.readouterr()
    assert_same_outputs(out, s3_server.options("outputs"), str(tmp_path / "local"))
    # the boxes beside the films were read (with the input options) into the localization tables
    assert admin.glob(f"{OUTPUT_BUCKET}/{prefix}/runs/*/localization.parquet")

    # No credential in any object under --out (logs included), nor in anything printed, refusals included.
    written = objects(admin, f"{OUTPUT_BUCKET}/{prefix}")
    assert any("/logs/" in p for p in written) and any(p.endswith("run.json") for p in written)
    blob = b"".join(admin.cat(p) for p in written)
    printed = refused.out + refused.err + said.out + said.err
    for secret in s3_server.secrets():
        assert secret.encode() not in blob
        assert secret not in printed
