"""Reading input files and writing test vectors (normgrad._io)."""

import json
import pickle

import numpy as np
import pytest

from normgrad import NormgradError
from normgrad._io import (
    load_array,
    load_named_arrays,
    parse_shape,
    read_vectors_csv,
    write_vectors,
)


def test_reads_every_format_as_float64(tmp_path, rng):
    x = rng.standard_normal((3, 4))
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x)
    np.savez(tmp_path / "c.npz", x=x, other=x + 1)
    (tmp_path / "d.json").write_text(json.dumps(x.tolist()))
    (tmp_path / "e.csv").write_text(
        "# a comment\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in x) + "\n\n"
    )
    for name in ("a.npy", "b.npz", "c.npz:other", "d.json", "e.csv"):
        got = load_array(tmp_path / name)
        assert got.dtype == np.float64 and got.shape == (3, 4)
        np.testing.assert_array_equal(got, x + 1 if name.endswith("other") else x)


def test_integers_and_one_d(tmp_path):
    (tmp_path / "i.json").write_text("[1, 2, 3]")
    np.save(tmp_path / "i.npy", np.arange(4, dtype=np.int32))
    np.testing.assert_array_equal(load_array(tmp_path / "i.json"), [1.0, 2.0, 3.0])
    assert load_array(tmp_path / "i.npy").dtype == np.float64


def test_returns_a_copy_not_the_file_buffer(tmp_path):
    x = np.arange(6.0).reshape(2, 3)
    np.save(tmp_path / "a.npy", x)
    a = load_array(tmp_path / "a.npy")
    a[0, 0] = 99.0
    assert load_array(tmp_path / "a.npy")[0, 0] == 0.0


BAD_FILES = {
    "empty.csv": b"",
    "comments.csv": b"# nothing\n# here\n",
    "ragged.csv": b"1,2,3\n4,5\n",
    "words.csv": b"1,2\n3,abc\n",
    "empty.json": b"[]",
    "ragged.json": b"[[1, 2], [3]]",
    "strings.json": b'[["a", "b"]]',
    "null.json": b"[1, null]",
    "broken.json": b"[[1, 2], [3, 4",
    "scalar.json": b"3.5",
    "object.json": b'{"x": [1, 2]}',
    "garbage.npy": b"this is not an npy file",
    "garbage.npz": b"PK this is not a zip",
    "truncated.npy": None,  # filled in below
    "pickled.npy": None,
    "pickled.npz": None,
    "strings.npy": None,
    "complex.npy": None,
    "empty.npy": None,
    "two.npz": None,
    "none.npz": None,
    "x.txt": b"1 2 3",
    "noext": b"1,2",
}


@pytest.fixture
def bad_files(tmp_path):
    paths = {}
    for name, data in BAD_FILES.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        paths[name] = p
    good = tmp_path / "good.npy"
    np.save(good, np.ones((4, 4)))
    paths["truncated.npy"].write_bytes(good.read_bytes()[:100])
    np.save(paths["pickled.npy"], np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(paths["pickled.npz"], x=np.array([{"a": 1}], dtype=object))
    np.save(paths["strings.npy"], np.array(["a", "b"]))
    np.save(paths["complex.npy"], np.array([1 + 2j]))
    np.save(paths["empty.npy"], np.zeros((0, 3)))
    np.savez(paths["two.npz"], a=np.ones(2), b=np.ones(2))
    np.savez(paths["none.npz"])
    return paths


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_malformed_files_raise_one_line_normgrad_error(bad_files, name):
    with pytest.raises(NormgradError) as info:
        load_array(bad_files[name])
    message = str(info.value)
    assert "\n" not in message and str(bad_files[name]) in message


def test_pickles_are_named_and_never_loaded(bad_files, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    for name in ("pickled.npy", "pickled.npz"):
        with pytest.raises(NormgradError, match="pickle"):
            load_array(bad_files[name])


def test_messages_say_what_is_wrong(bad_files):
    expect = {
        "ragged.csv": "ragged",
        "ragged.json": "ragged",
        "words.csv": "'abc' is not a number",
        "two.npz": "pick one",
        "x.txt": "unknown file type",
        "complex.npy": "complex",
        "empty.npy": "empty",
    }
    for name, text in expect.items():
        with pytest.raises(NormgradError, match=text):
            load_array(bad_files[name])


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("nan.json", "[1, NaN, 2]", r"NaN or Inf \(first at index \(1,\)"),
        ("inf.json", "[[1, 2], [Infinity, 4]]", r"index \(1, 0\)"),
        ("inf.csv", "1,2\n3,1e400\n", "NaN or Inf"),
        ("nan.csv", "nan,2\n", "NaN or Inf"),
        ("deep.json", "[" * 100_000 + "1" + "]" * 100_000, "nested too deeply"),
        ("hugeint.json", "[1, " + "9" * 400 + "]", "too large"),
    ],
)
def test_non_finite_deep_and_huge_inputs_are_refused(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(NormgradError, match=match) as info:
        load_array(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    np.save(tmp_path / "nan.npy", np.array([1.0, np.nan]))
    with pytest.raises(NormgradError, match="NaN or Inf"):
        load_array(tmp_path / "nan.npy")


def test_named_arrays_are_real_and_checked(tmp_path):
    np.savez(tmp_path / "ok.npz", mu=np.float64(2.0), var=np.ones((2, 2)))
    named = load_named_arrays(tmp_path / "ok.npz")
    assert named["mu"].shape == () and named["var"].dtype == np.float64
    (tmp_path / "ok.json").write_text('{"mu": 1, "var": [[1, 2]]}')
    assert load_named_arrays(tmp_path / "ok.json")["var"].shape == (1, 2)
    np.savez(tmp_path / "c.npz", mu=np.array([1 + 2j]))
    with pytest.raises(NormgradError, match=r"'mu'.*complex"):
        load_named_arrays(tmp_path / "c.npz")
    np.savez(tmp_path / "p.npz", mu=np.array([{"a": 1}], dtype=object))
    with pytest.raises(NormgradError, match="pickle"):
        load_named_arrays(tmp_path / "p.npz")
    (tmp_path / "n.json").write_text('{"mu": NaN}')
    with pytest.raises(NormgradError, match="NaN"):
        load_named_arrays(tmp_path / "n.json")


def test_writing_vectors_to_a_missing_folder_is_one_line(tmp_path, rng):
    arrays = {"x": rng.standard_normal(3)}
    for fmt in ("json", "csv", "npz"):
        with pytest.raises(NormgradError, match="cannot write") as info:
            write_vectors(arrays, {}, fmt, str(tmp_path / "no" / f"v.{fmt}"))
        assert "\n" not in str(info.value)
    with pytest.raises(NormgradError, match="cannot write"):
        write_vectors(arrays, {}, "json", str(tmp_path))  # a folder, not a file


def test_missing_file_and_missing_member(tmp_path):
    with pytest.raises(NormgradError, match="no such file"):
        load_array(tmp_path / "nope.npy")
    np.savez(tmp_path / "a.npz", x=np.ones(3))
    with pytest.raises(NormgradError, match="no array named 'y'"):
        load_array(f"{tmp_path / 'a.npz'}:y")


@pytest.mark.parametrize(
    ("text", "shape"), [("8x8", (8, 8)), ("2x3x4", (2, 3, 4)), ("5", (5,)), ("2,3", (2, 3))]
)
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["8xa", "0x3", "-1", "x", ""])
def test_parse_shape_refuses(text):
    with pytest.raises(NormgradError):
        parse_shape(text)


def test_vectors_round_trip_in_every_format(tmp_path, rng):
    arrays = {"x": rng.standard_normal((2, 3)), "mean": rng.standard_normal((1, 1))}
    options = {"axes": "all", "eps": 1e-5}
    write_vectors(arrays, options, "json", str(tmp_path / "v.json"))
    write_vectors(arrays, options, "csv", str(tmp_path / "v.csv"))
    write_vectors(arrays, options, "npz", str(tmp_path / "v.npz"))

    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["format"] == "normgrad-vectors" and doc["options"] == options
    for k, a in arrays.items():
        assert doc["arrays"][k]["shape"] == list(a.shape)
        np.testing.assert_array_equal(np.asarray(doc["arrays"][k]["data"]), a)  # exact

    opts, back = read_vectors_csv(tmp_path / "v.csv")
    assert opts == options
    for k, a in arrays.items():
        np.testing.assert_array_equal(back[k], a)

    with np.load(tmp_path / "v.npz", allow_pickle=False) as z:
        assert json.loads(str(z["__options__"])) == options
        for k, a in arrays.items():
            np.testing.assert_array_equal(z[k], a)


def test_vectors_to_text_and_npz_needs_a_file(rng):
    text = write_vectors({"x": np.ones(2)}, {}, "csv", None)
    assert text is not None and text.startswith("# format: normgrad-vectors")
    assert "array,index,value\nx,0,1.0\nx,1,1.0\n" in text
    with pytest.raises(NormgradError, match="--output"):
        write_vectors({"x": np.ones(2)}, {}, "npz", None)
