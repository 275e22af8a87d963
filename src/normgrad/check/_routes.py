"""`check_gradients(f, x)` with no `vjp`: where the backward under test comes from.

- `normgrad.external(cmd)`: the program's own `backward` (and `jvp` if it answers one), with
  one running process for the whole check, reaped at its end.
- a torch or JAX callable: the framework's backward and forward mode (`_frameworks`), with
  the inputs' names passed to `Target` and listed in the report's notes.

Anything else returns None, and `check_gradients` asks for a vjp as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._external import External
from ._frameworks import attach_names, convert, framework_of


def route(check: Callable[..., Any], f: Any, x: Any, kw: dict[str, Any]) -> Any:
    """The report of `check(f', x', vjp', **kw)` for a program or framework callable `f`."""
    if isinstance(f, External):
        with f:  # one running program for the whole check, reaped at its end
            if kw["jvp"] is None and f.supports_jvp(x):
                kw = kw | {"jvp": f.jvp}
            return check(f, x, f.vjp, **kw)
    framework = framework_of(f, x)
    if framework is None:
        return None
    c = convert(f, x, framework)
    report = check(c.f, c.x, c.vjp, **(kw | {"jvp": kw["jvp"] or c.jvp}))
    lead = 1 if report.notes and report.notes[0].startswith("the errors are in") else 0
    report.notes[lead:lead] = c.notes  # the wrong inputs lead (`_compare._wrong_inputs`)
    attach_names(report, c.names)
    return report
