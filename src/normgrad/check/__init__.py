"""A gradient checker that says what is wrong.

```python
from normgrad.check import check_gradients
report = check_gradients(f, x, vjp)      # f(x) -> y, vjp(x, dy) -> dx
print(report)                            # verdict, errors, findings with hints
report.ok, report.diagnosis[0].kind      # e.g. False, "diagonal"
```

`budgets=Budgets(probes=..., full_max=..., auto_full_max=..., localize_budget=...)` bounds the
work; `PROBES`, `FULL_MAX`, `AUTO_FULL_MAX` and `LOCALIZE_BUDGET` are its defaults. See
docs/checker.md for how it works. `check_hvp(f, x, grad, hvp)` checks a Hessian-vector product
(or, for a torch/JAX f, its double backward) the same way.
"""

from ._catalogue import KINDS
from ._compare import (
    AUTO_FULL_MAX,
    FULL_MAX,
    LOCALIZE_BUDGET,
    PROBES,
    Budgets,
    assert_gradients,
    check_gradients,
)
from ._hvp import check_hvp
from ._report import Finding, GradReport

__all__ = [
    "AUTO_FULL_MAX",
    "FULL_MAX",
    "KINDS",
    "LOCALIZE_BUDGET",
    "PROBES",
    "Budgets",
    "Finding",
    "GradReport",
    "assert_gradients",
    "check_gradients",
    "check_hvp",
]
