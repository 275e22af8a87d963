"""Reading input arrays from files and writing reference test vectors.

Input files hold one numeric array: `.npy` (read with `allow_pickle=False`), `.npz` (one
array, or pick one with `file.npz:name`), `.csv` (rows of numbers, `#` comments) or `.json`
(nested lists of numbers). Values must be real and finite. Anything else, and every malformed
file, raises `NormgradError` with a one-line message that says how to fix it.

Test vectors (`normgrad vectors`) are written as JSON, CSV or NPZ; every layout records the
options that produced it (see docs/cli.md, "vectors").
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._errors import NormgradError

INPUT_SUFFIXES = (".npy", ".npz", ".csv", ".json")
VECTOR_FORMATS = ("json", "csv", "npz")
VECTORS_VERSION = 1


def load_array(spec: str | Path) -> NDArray[np.float64]:
    """Read one real array from `spec` (a path, or `file.npz:name`) as float64.

    The array must be non-empty, rectangular, real and finite; integers and booleans become
    floats.
    """
    text = str(spec)
    member = None
    if ".npz:" in text:
        text, member = text.rsplit(":", 1)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise NormgradError(
            f"cannot read {path}: unknown file type {suffix or '(none)'!r}; give a .npy, .npz, "
            ".csv or .json file."
        )
    with _reading(path, "one numeric array"):
        if suffix == ".npy":
            raw = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            raw = _read_npz(path, member)
        elif suffix == ".csv":
            raw = _read_csv(path)
        else:
            raw = _read_json(path)
        return _as_real_array(raw, path)


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn every failure to read `path` into one `NormgradError` line: a missing file, a
    pickle (never loaded), a malformed or too deeply nested file, a number too large."""
    if not path.is_file():
        raise NormgradError(f"cannot read {path}: no such file; check the path.")
    kind = path.suffix.lower()[1:]
    try:
        yield
    except NormgradError:
        raise
    except RecursionError:
        raise NormgradError(
            f"cannot read {path}: it is nested too deeply; give {what} of at most a few "
            "dozen dimensions."
        ) from None
    except (OSError, ValueError, EOFError, OverflowError, zipfile.BadZipFile) as e:
        if isinstance(e, ValueError) and "pickle" in str(e).lower():
            raise NormgradError(
                f"{path} holds Python objects (a pickle), which normgrad never loads; save "
                "numbers instead, e.g. np.save(path, np.asarray(x, dtype=float))."
            ) from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NormgradError(
            f"cannot read {path} as {kind}: {reason}; check that the file is a valid {kind} "
            f"file with {what} (finite float64 numbers)."
        ) from None


def _read_npz(path: Path, member: str | None) -> Any:
    with np.load(path, allow_pickle=False) as data:
        names = list(data.files)
        if not names:
            raise NormgradError(f"{path} holds no arrays; save one with np.savez(path, x=x).")
        if member is None:
            if len(names) > 1:
                raise NormgradError(
                    f"{path} holds {len(names)} arrays ({', '.join(names)}); pick one with "
                    f"{path}:{names[0]}."
                )
            member = names[0]
        if member not in names:
            raise NormgradError(
                f"{path} has no array named {member!r}; it holds {', '.join(names)}."
            )
        return data[member]


def _read_csv(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        cells = [c.strip() for c in next(csv.reader([stripped]))]
        try:
            rows.append([float(c) for c in cells])
        except ValueError:
            bad = next(c for c in cells if not _is_float(c))
            raise NormgradError(
                f"{path}, line {lineno}: {bad!r} is not a number; a CSV input holds only numbers "
                "separated by commas (comment lines start with #)."
            ) from None
    if not rows:
        raise NormgradError(f"{path} holds no numbers; write one row of numbers per line.")
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise NormgradError(
            f"{path} is ragged: its rows have {sorted(widths)} values; every row needs the same "
            "number of values."
        )
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NormgradError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); write the "
            "array as nested lists of numbers, e.g. [[1, 2], [3, 4]]."
        ) from None


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _as_real_array(
    raw: Any, path: Path, name: str | None = None, scalar: bool = False
) -> NDArray[np.float64]:
    """`raw` (an array, or JSON data) as a fresh float64 array, refused with a message naming
    `path` (and the array's `name`) unless real, finite, non-empty, and not 0-d (unless
    `scalar`)."""
    where = f"{path}" if name is None else f"{path}, array {name!r},"
    if isinstance(raw, np.ndarray):
        arr = raw
    else:
        _check_nested(raw, path)
        arr = np.asarray(raw, dtype=np.float64)
    if arr.dtype.kind not in "biuf":
        raise NormgradError(
            f"{where} holds values of dtype {arr.dtype}; normgrad needs real numbers (float, "
            "int or bool)."
        )
    if arr.ndim == 0 and not scalar:
        raise NormgradError(
            f"{where} holds a single number; give an array with at least one dimension."
        )
    if arr.size == 0:
        raise NormgradError(f"{where} holds an empty array (shape {arr.shape}); give some numbers.")
    out = np.array(arr, dtype=np.float64)  # a copy: never alias the file's buffer
    bad = ~np.isfinite(out)
    if np.any(bad):
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), out.shape))
        raise NormgradError(
            f"{where} holds NaN or Inf (first at index {first}, of {int(bad.sum())}); normgrad "
            "needs finite numbers."
        )
    return out


def _check_nested(raw: Any, path: Path) -> None:
    """Refuse JSON that is not a rectangular nest of numbers, with a message that says where."""

    def shape_of(node: Any, where: str) -> tuple[int, ...]:
        if isinstance(node, bool) or isinstance(node, (int, float)):
            return ()
        if isinstance(node, list):
            if not node:
                raise NormgradError(
                    f"{path}: {where or 'the array'} is an empty list; give numbers."
                )
            shapes = [shape_of(v, f"{where}[{i}]") for i, v in enumerate(node)]
            if len(set(shapes)) > 1:
                raise NormgradError(
                    f"{path} is ragged: the items of {where or 'the top-level list'} have "
                    f"different shapes {sorted(set(shapes))}; every row needs the same length."
                )
            return (len(node), *shapes[0])
        raise NormgradError(
            f"{path}: {where or 'the value'} is {json.dumps(node)[:40]}, not a number; the input "
            "must be nested lists of numbers."
        )

    shape_of(raw, "")


def load_named_arrays(spec: str | Path) -> dict[str, Any]:
    """Read named arrays: a JSON object (name -> number or nested lists) or an `.npz` file."""
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".npz"):
        raise NormgradError(
            f"cannot read named arrays from {path}: give a .json object (name -> nested lists) "
            "or an .npz file."
        )
    with _reading(path, "named numeric arrays"):
        if suffix == ".json":
            doc = _read_json(path)
            if not isinstance(doc, dict) or not doc:
                raise NormgradError(
                    f'{path} must hold a JSON object of named arrays, like {{"mu": -3.2, '
                    '"var": [[...]]}}.'
                )
            items = list(doc.items())
        else:
            with np.load(path, allow_pickle=False) as data:
                items = [(k, data[k]) for k in data.files]
        return {str(k): _as_real_array(v, path, str(k), scalar=True) for k, v in items}


def parse_shape(text: str) -> tuple[int, ...]:
    """`"8x8"` -> `(8, 8)`; also accepts `8,8` and a single `8`."""
    parts = text.lower().replace(",", "x").replace("×", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise NormgradError(
            f"shape {text!r} is not a list of sizes; write it like 8x8 or 2x3x4."
        ) from None
    if any(s <= 0 for s in shape):
        raise NormgradError(f"shape {text!r} has a size <= 0; every size must be at least 1.")
    return shape


# ---------------------------------------------------------------------------------------------
# Test vectors
# ---------------------------------------------------------------------------------------------


def vectors_format(path: str | None, fmt: str | None) -> str:
    """The output format: `fmt` if given, else from the file's suffix, else JSON."""
    if fmt is not None:
        return fmt
    if path is None or path == "-":
        return "json"
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in VECTOR_FORMATS:
        raise NormgradError(
            f"cannot tell the format of {path} from its suffix; name it .json, .csv or .npz, or "
            "pass --format."
        )
    return suffix


def write_vectors(
    arrays: Mapping[str, NDArray[Any]],
    options: Mapping[str, Any],
    fmt: str,
    out: str | None,
) -> str | None:
    """Write the arrays and the options that made them; return the text when `out` is None/`-`.

    - json: `{"format": "normgrad-vectors", "version", "options", "arrays": {name: {"shape",
      "dtype", "data"}}}` with `data` as nested lists.
    - csv: `#` header lines (format, version, options as JSON, one `# array NAME shape=AxB
      dtype=D` line per array), then `array,index,value` rows, `index` being the C-order
      flat index into that array.
    - npz: one entry per array plus `__options__`, a 0-d string holding the options as JSON
      (no pickles: load with `allow_pickle=False`).
    """
    if fmt not in VECTOR_FORMATS:
        raise NormgradError(f"--format must be one of {', '.join(VECTOR_FORMATS)}; got {fmt!r}.")
    to_stdout = out is None or out == "-"
    if fmt == "npz" and to_stdout:
        raise NormgradError("NPZ is binary; give a file with --output FILE.npz.")
    if fmt != "npz":
        text = _vectors_json(arrays, options) if fmt == "json" else _vectors_csv(arrays, options)
        if to_stdout:
            return text
    assert out is not None
    try:
        if fmt == "npz":
            payload = {k: np.asarray(v) for k, v in arrays.items()}
            payload["__options__"] = np.asarray(json.dumps(dict(options), sort_keys=True))
            with open(out, "wb") as fh:
                np.savez(fh, **payload)  # type: ignore[arg-type]
        else:
            Path(out).write_text(text, encoding="utf-8")
    except OSError as e:
        raise NormgradError(
            f"cannot write {out}: {e.strerror or e}; give a file path in an existing, writable "
            "folder."
        ) from None
    return None


def _header(options: Mapping[str, Any]) -> dict[str, Any]:
    return {"format": "normgrad-vectors", "version": VECTORS_VERSION, "options": dict(options)}


def _vectors_json(arrays: Mapping[str, NDArray[Any]], options: Mapping[str, Any]) -> str:
    doc = _header(options)
    doc["arrays"] = {
        name: {"shape": list(a.shape), "dtype": str(a.dtype), "data": _tolist(a)}
        for name, a in arrays.items()
    }
    return json.dumps(doc, indent=1) + "\n"


def _tolist(a: NDArray[Any]) -> Any:
    # float(repr) round-trips exactly; float32 values are written as the float64 they equal.
    return np.asarray(a, dtype=np.float64).tolist()


def _vectors_csv(arrays: Mapping[str, NDArray[Any]], options: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    buf.write(f"# format: normgrad-vectors, version {VECTORS_VERSION}\n")
    buf.write(f"# options: {json.dumps(dict(options), sort_keys=True)}\n")
    buf.write("# layout: one row per element; index = C-order (row-major) flat index\n")
    for name, a in arrays.items():
        shape = "x".join(str(s) for s in a.shape) or "scalar"
        buf.write(f"# array {name} shape={shape} dtype={a.dtype}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["array", "index", "value"])
    for name, a in arrays.items():
        for i, v in enumerate(np.asarray(a, dtype=np.float64).ravel()):
            writer.writerow([name, i, repr(float(v))])
    return buf.getvalue()


def read_vectors_csv(path: str | Path) -> tuple[dict[str, Any], dict[str, NDArray[np.float64]]]:
    """Read a CSV written by `write_vectors` back: `(options, arrays)` (the layout's reference)."""
    options: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    values: dict[str, list[float]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("# options: "):
                options = json.loads(line[len("# options: ") :])
            elif line.startswith("# array "):
                name, shape_field, _ = line[len("# array ") :].split()
                dims = shape_field.split("=", 1)[1]
                shapes[name] = () if dims == "scalar" else tuple(int(d) for d in dims.split("x"))
                values[name] = []
            elif line.startswith("#") or line.startswith("array,"):
                continue
            elif line.strip():
                name, _, value = line.rstrip("\n").split(",")
                values[name].append(float(value))
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(shapes[k]) for k, v in values.items()}
    return options, arrays
