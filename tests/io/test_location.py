"""pipeline.io.location: a rooted filesystem that carries its options (masked), travels by pickle
without its filesystem, and hands each input the options of the dataset it belongs to."""

from __future__ import annotations

import pickle

import pytest

from pipeline.io.location import InputOptions, InputRefused, Location, reading_inputs
from pipeline.store.layout import OutputStore

from tests import guarded_fs

SECRET = "l0cation-SECRET-9"


@pytest.fixture
def stores():
    guarded_fs.register()
    guarded_fs.clear()
    yield
    guarded_fs.clear()


def test_a_location_opens_joins_and_names_paths_under_its_root(stores):
    fs = guarded_fs.input_fs()
    fs.pipe("/bucket/in/a/b.txt", b"hello")
    loc = Location("guardedin://bucket/in/", guarded_fs.INPUT_OPTIONS)
    assert loc.url == "guardedin://bucket/in" and loc.path == "/bucket/in"
    assert loc.join("a", "b.txt") == "guardedin://bucket/in/a/b.txt"
    with loc.open(loc.join("a", "b.txt")) as f:
        assert f.read() == b"hello"
    assert loc.exists(loc.join("a", "b.txt")) and not loc.exists(loc.join("a", "c.txt"))
    assert loc.child("a").exists("guardedin:///bucket/in/a/b.txt")  # as fsspec names it back
    assert loc.url_of("/bucket/in/a/b.txt") == "guardedin:///bucket/in/a/b.txt"
    assert loc.fs is loc.fs  # resolved once per object
    # the root's filesystem for paths below it; a path elsewhere is resolved with the same options
    assert loc.resolve(loc.join("a"))[0] is loc.fs
    assert Location("guarded://bucket/out", guarded_fs.OPTIONS).resolve("guarded://other/x")[1] == "/other/x"


def test_each_store_refuses_the_others_options(stores):
    with pytest.raises(PermissionError):
        _ = Location("guardedin://bucket/in", guarded_fs.OPTIONS).fs
    with pytest.raises(PermissionError):
        _ = Location("guarded://bucket/out", guarded_fs.INPUT_OPTIONS).fs
    with pytest.raises(PermissionError):
        _ = Location("guarded://bucket/out").fs


def test_a_location_pickles_without_its_filesystem_and_shows_no_credentials(stores):
    loc = Location("guarded://user:pw@bucket/out", {"token": guarded_fs.TOKEN, "secret": SECRET})
    text = repr(loc)
    assert SECRET not in text and guarded_fs.TOKEN not in text and "pw" not in text and "'secret', 'REDACTED'" in text
    plain = Location("guarded://bucket/out", guarded_fs.OPTIONS)
    plain.fs.pipe(plain.path + "/f", b"x")  # resolved here ...
    back = pickle.loads(pickle.dumps(plain))
    assert back == plain and "_resolved" not in vars(back)  # ... not pickled: each process opens its own
    assert back.exists(back.join("f"))  # and can: the options travelled
    assert SECRET not in repr(pickle.loads(pickle.dumps(loc)))
    assert dict(back.options) == guarded_fs.OPTIONS and SECRET not in repr(loc.options)


def test_the_output_store_is_a_location_with_the_paths_of_the_contract(stores):
    store = OutputStore("guarded://bucket/out", guarded_fs.OPTIONS)
    assert store.root == Location("guarded://bucket/out", guarded_fs.OPTIONS)
    store.write_json(store.latest, {"a": 1})
    assert store.read_json(store.latest) == {"a": 1} and store.fs(store.latest)[0] is store.root.fs
    back = pickle.loads(pickle.dumps(store))
    assert back == store and back.read_json(back.latest) == {"a": 1}


def test_input_options_give_each_file_its_datasets_options():
    a = Location("s3://films/a", {"key": "A"})
    nested = Location("s3://films/a/special", {"key": "S"})
    inputs = InputOptions({"key": "D"}, (a, nested))
    assert dict(inputs.options_for("s3://films/a/images/1.png")) == {"key": "A"}
    assert dict(inputs.options_for("s3://films/a/special/1.png")) == {"key": "S"}  # the most specific folder
    assert dict(inputs.options_for("s3://films/ab/1.png")) == {"key": "D"}  # a name that only starts alike
    assert dict(inputs.options_for("/local/films/1.png")) == {"key": "D"}
    assert inputs.at("s3://films/a/x.csv") == Location("s3://films/a/x.csv", {"key": "A"})
    assert inputs.keys() == ["key"] and "'A'" not in repr(inputs) and "'D'" not in repr(inputs)
    assert pickle.loads(pickle.dumps(inputs)) == inputs
    assert dict(InputOptions().options_for("s3://x/y")) == {}


def test_a_refused_input_says_so_without_the_credentials():
    with pytest.raises(InputRefused) as e:
        with reading_inputs("--checkpoint s3://bucket/m.safetensors"):
            raise PermissionError(f"denied for https://user:{SECRET}@host/x")
    assert isinstance(e.value, PermissionError) and "reading --checkpoint s3://bucket/m.safetensors" in str(e.value)
    assert SECRET not in str(e.value)
    with pytest.raises(ValueError):  # only refusals are translated
        with reading_inputs("x"):
            raise ValueError("other")
