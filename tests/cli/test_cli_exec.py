"""`normgrad check --exec CMD`: a program speaking the line protocol, and its failures as exit
2 with a few lines and no traceback."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from _cli_helpers import run, run_json

RIGHT = textwrap.dedent(
    """
    import sys
    import numpy as np
    def read(tok, k):
        nd = int(tok[k]); shape = tuple(int(t) for t in tok[k + 1 : k + 1 + nd])
        n = int(np.prod(shape)); a = np.array([float(t) for t in tok[k + 1 + nd : k + 1 + nd + n]])
        return a.reshape(shape), k + 1 + nd + n
    def write(a):
        print(" ".join([str(a.ndim), *map(str, a.shape), *(repr(float(v)) for v in a.ravel())]),
              flush=True)
    for line in sys.stdin:
        tok = line.split(); x, k = read(tok, 1)
        s = np.sqrt(x.var() + 1e-5); y = (x - x.mean()) / s
        if tok[0] == "forward":
            write(y)
        elif tok[0] == "backward":
            dy, _ = read(tok, k)
            write((dy - dy.mean() - y * (dy * y).mean()) / s)
        else:
            print("error unsupported", flush=True)
    """
)


@pytest.fixture
def script(tmp_path):
    def make(body: str) -> str:
        path = tmp_path / "p.py"
        path.write_text(body)
        return f"{sys.executable} {path}"

    return make


def test_a_right_program_passes(script, capsys):
    code, out, err = run(capsys, "check", "--exec", script(RIGHT), "--shape", "4x5")
    assert code == 0, (out, err)
    assert "PASS" in out


def test_input_file_and_json(script, capsys, tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 3))
    np.save(tmp_path / "x.npy", x)
    code, doc, _ = run_json(
        capsys, "check", "--exec", script(RIGHT), "--input", str(tmp_path / "x.npy")
    )
    assert code == 0 and doc["ok"] and doc["options"]["shape"] == [3, 3]
    assert doc["options"]["timeout"] == 60.0


@pytest.mark.parametrize(
    ("body", "timeout", "words"),
    [
        (
            "import sys\nprint('boom', file=sys.stderr)\nsys.exit(4)\n",
            "5",
            ["exit status 4", "boom"],
        ),
        (
            "import sys\nfor l in sys.stdin: print('hello there', flush=True)\n",
            "5",
            ["'hello there'"],
        ),
        ("import time\ntime.sleep(30)\n", "0.3", ["within 0.3 s"]),
        (
            "import sys\nfor l in sys.stdin: print('1 2 1.0 2.0', flush=True)\n",
            "5",
            ["shape (2,)", "expected"],
        ),
    ],
)
def test_a_failing_program_is_exit_2_with_a_few_lines(script, capsys, body, timeout, words):
    code, out, err = run(
        capsys, "check", "--exec", script(body), "--shape", "3x3", "--timeout", timeout
    )
    assert code == 2, (out, err)
    assert "Traceback" not in err and err.count("\n") <= 8, err
    for w in words:
        assert w in err, err


def test_a_missing_program_and_bad_options(capsys):
    code, _, err = run(capsys, "check", "--exec", "no-such-program-17", "--shape", "3x3")
    assert code == 2 and "cannot start" in err and "Traceback" not in err
    code, _, err = run(capsys, "check", "--exec", "x", "--timeout", "0")
    assert code == 2 and "timeout" in err
    code, _, err = run(capsys, "check", "--exec", "x", "--forward", "f.py:f")
    assert code == 2 and "drop --forward" in err
