"""A forward and backward written in any language, reached through a line protocol (version 1).

```python
with normgrad.external("mono norm.exe right") as prog:
    report = check_gradients(prog, x)
```

normgrad starts the program once (the command split as a POSIX shell splits words, no shell in
between) and keeps it running. Each request is one line on its stdin, each answer one line on
its stdout; its stderr is kept for error messages. See docs/protocol.md for the grammar:

    forward <x>        ->  <y>
    backward <x> <dy>  ->  <dx>
    jvp <x> <tx>       ->  <ty>          (optional; `error unsupported` is fine)
    array: <ndim> <d1> ... <dn> <v1> ... <vN>, values in C order, 17 significant digits
    error <message>    : the program cannot serve the request; normgrad reports the message

Every failure of the program (it crashes, exits early, hangs past `timeout` seconds per answer,
prints a line that is not an answer, or answers with the wrong shape) raises `NormgradError`
with what happened, the offending line cut short and the tail of its stderr. The process is
always reaped: on `close()`, at the end of a `with` block, after `check_gradients`, or when the
object is collected.
"""

from __future__ import annotations

import collections
import math
import queue
import re
import shlex
import subprocess
import threading
import weakref
from typing import IO, Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from .._errors import NormgradError

PROTOCOL_VERSION = 1
MAX_NDIM = 32  # more dimensions than NumPy allows is a malformed line, not an array
_SHOWN = 120  # characters of an offending line shown in an error
_TAIL = 20  # lines of the program's stderr kept for error messages
_FLOAT = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)", re.I)
_COUNT = re.compile(r"\d+")


def shorten(text: str, limit: int = _SHOWN) -> str:
    """`text` as shown in a message: repr-quoted, cut to about `limit` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def format_array(a: Any) -> str:
    """An array in the protocol's grammar: `<ndim> <d1> ... <dn> <v1> ... <vN>` (C order,
    17 significant digits, so a float64 survives the round trip exactly)."""
    arr = np.asarray(a, dtype=np.float64)
    head = [str(arr.ndim), *(str(d) for d in arr.shape)]
    return " ".join(head + [format(float(v), ".17g") for v in arr.ravel()])


def parse_array(tokens: list[str], start: int = 0) -> tuple[NDArray[np.float64], int]:
    """Read one array from `tokens[start:]`; returns it and the index after it. Raises
    `ValueError` naming what is wrong (the caller adds the line and the program)."""
    ndim = _count(tokens, start, "ndim")
    if ndim > MAX_NDIM:
        raise ValueError(f"ndim {ndim} is more than {MAX_NDIM}")
    shape = tuple(_count(tokens, start + 1 + k, f"dimension {k + 1}") for k in range(ndim))
    size = math.prod(shape)
    first = start + 1 + ndim
    if len(tokens) - first < size:
        raise ValueError(f"shape {shape} needs {size} values; the line has {len(tokens) - first}")
    values = tokens[first : first + size]
    for k, v in enumerate(values):
        if not _FLOAT.fullmatch(v):
            raise ValueError(f"value {k + 1} is {shorten(v, 40)}, not a decimal number")
    arr = np.array([float(v) for v in values], dtype=np.float64).reshape(shape)
    return arr, first + size


def _count(tokens: list[str], k: int, what: str) -> int:
    if k >= len(tokens):
        raise ValueError(f"the line ends where {what} should be")
    tok = tokens[k]
    if not _COUNT.fullmatch(tok) or len(tok) > 18:
        raise ValueError(f"{what} is {shorten(tok, 40)}, not a non-negative integer")
    return int(tok)


def parse_answer(line: str, expected: tuple[int, ...] | None) -> NDArray[np.float64]:
    """One answer line: an array (of shape `expected` when given), or `error <message>`.
    Raises `ValueError` for a malformed line and `_Refused` for an `error` answer."""
    text = line.rstrip("\r\n")
    if text == "error" or text.startswith("error "):
        raise _Refused(text[6:].strip() or "(no message)")
    tokens = text.split()
    if not tokens:
        raise ValueError("the line is empty")
    arr, end = parse_array(tokens)
    if end != len(tokens):
        raise ValueError(f"{len(tokens) - end} tokens follow the array")
    if expected is not None and arr.shape != expected:
        raise ValueError(f"the answer has shape {arr.shape}; expected {expected}")
    return arr


class _Refused(Exception):
    """The program answered `error <message>`."""


class External:
    """A running program that speaks the protocol; `normgrad.external(cmd)` makes one.

    `prog(x)` is the forward, `prog.vjp(x, dy)` the backward and `prog.jvp(x, tx)` the forward
    derivative; `check_gradients(prog, x)` checks them. Use it as a context manager, or call
    `close()`; the process is reaped in any case when the object goes away.
    """

    def __init__(self, command: str, *, timeout: float = 60.0) -> None:
        if not isinstance(command, str) or not command.strip():
            raise NormgradError(
                f"external() takes the command as one string, e.g. external('./norm right'); "
                f"got {command!r}."
            )
        try:
            self.argv = shlex.split(command)
        except ValueError as e:
            raise NormgradError(f"cannot split the command {command!r}: {e}.") from None
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise NormgradError(f"timeout must be a number of seconds > 0; got {timeout!r}.")
        self.command, self.timeout = command, float(timeout)
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=_TAIL)
        self._y_shape: tuple[int, ...] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._err_reader: threading.Thread | None = None
        self.__name__ = f"external({command!r})"

    # -- the three requests ----------------------------------------------------------------

    def __call__(self, x: Any) -> NDArray[np.float64]:
        y = self._ask(f"forward {format_array(x)}", self._y_shape, "forward")
        if self._y_shape is None:
            self._y_shape = y.shape
        return y

    def vjp(self, x: Any, dy: Any) -> NDArray[np.float64]:
        shape = np.shape(x)
        return self._ask(f"backward {format_array(x)} {format_array(dy)}", shape, "backward")

    def jvp(self, x: Any, tx: Any) -> NDArray[np.float64]:
        if self._y_shape is None:
            self(x)
        return self._ask(f"jvp {format_array(x)} {format_array(tx)}", self._y_shape, "jvp")

    def supports_jvp(self, x: Any) -> bool:
        """Whether the program answers `jvp` (asked once, with a zero tangent)."""
        try:
            self.jvp(x, np.zeros(np.shape(x)))
        except NormgradError as e:
            if isinstance(e.__cause__, _Refused):
                return False
            raise
        return True

    # -- the process -----------------------------------------------------------------------

    def __enter__(self) -> External:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the program: close its stdin (the protocol's 'exit'), wait briefly, then kill.
        A later request starts it again."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc, self._finalizer = None, None

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is not None:
            return self._proc
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
        except OSError as e:
            raise NormgradError(
                f"cannot start {self.argv[0]!r} (from the command {self.command!r}): {e}. Check "
                "the path, or build the program first."
            ) from None
        self._lines, self._stderr = queue.Queue(), collections.deque(maxlen=_TAIL)
        _reader(proc.stdout, self._lines.put)
        self._err_reader = _reader(proc.stderr, self._stderr.append)
        self._proc = proc
        self._finalizer = weakref.finalize(self, _reap, proc)
        return proc

    def _ask(self, request: str, expected: tuple[int, ...] | None, what: str) -> NDArray[Any]:
        proc = self._start()
        try:
            assert proc.stdin is not None
            proc.stdin.write(request + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail(f"the program exited before the {what} request could be sent")
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            self._fail(f"no answer to the {what} request within {self.timeout:g} s (--timeout)")
        if line is None:
            self._fail(f"the program's stdout ended before it answered the {what} request")
        try:
            return parse_answer(line, expected)
        except _Refused as e:
            raise NormgradError(
                f"{self._who()} refused the {what} request: {e}{self._tail()}"
            ) from e
        except ValueError as e:
            self._fail(f"its answer to the {what} request is not an array: {e}", line)

    def _fail(self, what: str, line: str | None = None) -> NoReturn:
        """Stop the program and raise: what happened, the line, the tail of its stderr."""
        proc = self._proc
        self.close()
        if self._err_reader is not None:  # the program is gone: let its last words arrive
            self._err_reader.join(timeout=1.0)
        status = ""
        if proc is not None and proc.returncode is not None and proc.returncode != 0:
            status = f" (exit status {proc.returncode})"
        shown = f"\n  line: {shorten(line.rstrip(chr(10)))}" if line is not None else ""
        raise NormgradError(f"{self._who()}: {what}{status}.{shown}{self._tail()}")

    def _who(self) -> str:
        return f"the program {self.command!r}"

    def _tail(self) -> str:
        lines = [ln.rstrip("\n") for ln in list(self._stderr) if ln is not None][-5:]
        if not lines:
            return ""
        return "\n  its stderr ends with:\n" + "\n".join(f"    {shorten(s)[1:-1]}" for s in lines)


def external(command: str, *, timeout: float = 60.0) -> External:
    """A program in any language as a forward and backward for `check_gradients`:
    `check_gradients(normgrad.external("./norm right"), x)`. `timeout` is the limit per answer,
    in seconds. See docs/protocol.md."""
    return External(command, timeout=timeout)


def _reader(stream: IO[str] | None, put: Any) -> threading.Thread:
    """A daemon thread that hands each line of `stream` to `put`, then None at its end."""

    def run() -> None:
        assert stream is not None
        try:
            for line in stream:
                put(line)
        except (OSError, ValueError):  # the stream was closed under us by _reap
            pass
        put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _reap(proc: subprocess.Popen[str]) -> None:
    """Close stdin (end of input means exit), give the program a moment, then kill; always
    wait, so no zombie is left."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
