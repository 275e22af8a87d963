"""The line protocol (docs/protocol.md): parsing fuzzed, and every failure mode of a program."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normgrad
from normgrad import NormgradError
from normgrad.check import check_gradients
from normgrad.check._external import format_array, parse_answer, parse_array

# A correct normalization in Python, speaking the protocol; MODE plants a failure.
PROGRAM = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    MODE = sys.argv[1]
    def read(tok, k):
        nd = int(tok[k]); shape = tuple(int(t) for t in tok[k + 1 : k + 1 + nd])
        n = int(np.prod(shape)); a = np.array([float(t) for t in tok[k + 1 + nd : k + 1 + nd + n]])
        return a.reshape(shape), k + 1 + nd + n
    def write(a):
        print(" ".join([str(a.ndim), *map(str, a.shape), *(repr(float(v)) for v in a.ravel())]),
              flush=True)
    def norm(x):
        s = np.sqrt(x.var() + 1e-5); return (x - x.mean()) / s, s
    for count, line in enumerate(sys.stdin):
        tok = line.split(); x, k = read(tok, 1); y, s = norm(x)
        if MODE == "crash" and tok[0] == "backward":
            print("about to divide by zero", file=sys.stderr, flush=True); sys.exit(3)
        if MODE == "exit" and tok[0] == "backward":
            sys.exit(0)
        if MODE == "hang" and tok[0] == "backward":
            time.sleep(60)
        if MODE == "junk" and tok[0] == "backward":
            print("dx = " + "9" * 500, flush=True); continue
        if MODE == "shape" and tok[0] == "backward":
            write(x.ravel()); continue
        if MODE == "refuse" and tok[0] == "backward":
            print("error matrix is singular", flush=True); continue
        if tok[0] == "forward":
            write(y)
        elif tok[0] == "backward":
            dy, _ = read(tok, k)
            write((dy - dy.mean() - y * (dy * y).mean()) / s)
        elif tok[0] == "jvp" and MODE == "jvp":
            tx, _ = read(tok, k)
            write((tx - tx.mean() - y * (tx * y).mean()) / s)
        else:
            print("error unsupported", flush=True)
    """
)


@pytest.fixture
def prog(tmp_path: Path):
    path = tmp_path / "prog.py"
    path.write_text(PROGRAM)

    def make(mode: str, timeout: float = 30.0) -> normgrad.External:
        return normgrad.external(f"{sys.executable} {path} {mode}", timeout=timeout)

    return make


X = np.random.default_rng(3).standard_normal((3, 4))


def test_a_correct_program_passes_and_is_reaped(prog):
    p = prog("ok")
    report = check_gradients(p, X)
    assert report.ok, report
    assert p._proc is None  # closed at the end of the check


def test_jvp_is_checked_when_the_program_answers_it(prog):
    p = prog("jvp")
    assert p.supports_jvp(X)
    assert check_gradients(p, X).ok
    assert not prog("ok").supports_jvp(X)  # `error unsupported` means: no jvp


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("crash", ["stdout ended", "exit status 3", "about to divide by zero"]),
        ("exit", ["stdout ended"]),
        ("hang", ["no answer", "within 0.5 s"]),
        ("junk", ["not an array", "'dx = 999", "(505 characters)"]),
        ("shape", ["shape (12,)", "expected (3, 4)"]),
        ("refuse", ["refused the backward request: matrix is singular"]),
    ],
)
def test_each_failure_is_a_clear_error_and_the_process_is_reaped(prog, mode, words):
    p = prog(mode, timeout=0.5 if mode == "hang" else 30.0)
    with pytest.raises(NormgradError) as e:
        check_gradients(p, X)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert p._proc is None


def test_a_missing_program_is_named():
    with pytest.raises(NormgradError, match="cannot start 'no-such-program-17'"):
        check_gradients(normgrad.external("no-such-program-17 right"), X)


@pytest.mark.parametrize("bad", ["", "   ", 'unbalanced "quote', 3])
def test_a_bad_command_is_refused(bad):
    with pytest.raises(NormgradError):
        normgrad.external(bad)  # type: ignore[arg-type]


def test_the_process_is_reaped_when_the_object_goes_away(prog):
    p = prog("ok")
    p(X)
    proc = p._proc
    assert proc is not None and proc.poll() is None
    del p
    import gc

    gc.collect()
    assert proc.returncode is not None


# -- parsing -------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@given(
    shapes.flatmap(
        lambda s: st.tuples(
            st.just(tuple(s)), st.lists(finite, min_size=int(np.prod(s)), max_size=int(np.prod(s)))
        )
    )
)
@settings(max_examples=200, deadline=None)
def test_arrays_survive_the_round_trip_exactly(case):
    shape, values = case
    a = np.array(values, dtype=np.float64).reshape(shape)
    b = parse_answer(format_array(a), shape)
    assert b.shape == shape and np.array_equal(a, b)


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_malformed_lines_raise_value_error_only(text):
    try:
        arr = parse_answer(text, None)
    except ValueError:
        return
    except Exception as e:  # _Refused: the line was `error ...`
        assert text.startswith("error"), repr(e)
        return
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float64


@given(st.sampled_from(["nan", "NaN", "-inf", "Infinity", "1e308", "-0.0", ".5", "5.", "1E-3"]))
def test_any_decimal_float_syntax_is_read(tok):
    assert parse_answer(f"1 1 {tok}", (1,))[0] == pytest.approx(float(tok), nan_ok=True)


@pytest.mark.parametrize(
    "line",
    [
        "1 2 1.0",  # too few values
        "1 2 1.0 2.0 3.0",  # tokens after the array
        "1 1 0x10",  # not decimal
        "1 1 1_000",  # Python accepts this; the protocol does not
        "-1 1.0",  # negative ndim
        "99 1",  # more dimensions than allowed
        "2 99999999999999999999999 1 1.0",  # a huge dimension
        "1 3 " + "1" * 100000 + " 2 3",  # a huge token is read (it is a number) ...
    ],
)
def test_bad_lines(line):
    if line.startswith("1 3 1111"):
        assert parse_answer(line, (3,))[0] == float("1" * 100000)
        return
    with pytest.raises(ValueError):
        parse_answer(line, None)


def test_parse_array_reads_several_arrays_from_one_line():
    tok = "2 1 2 1 2 1 1 5".split()
    a, k = parse_array(tok)
    b, end = parse_array(tok, k)
    assert a.shape == (1, 2) and b.tolist() == [5.0] and end == len(tok)
