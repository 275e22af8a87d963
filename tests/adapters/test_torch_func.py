"""torch.func transforms over normgrad.torch against the same transforms of torch's norms."""

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
func = torch.func

from normgrad import testing  # noqa: E402
from normgrad.torch import MeanVarNorm, normalize  # noqa: E402

TOL = dict(rtol=0, atol=1e-10)
G = torch.Generator().manual_seed(0)
X = torch.randn(4, 3, 5, generator=G, dtype=torch.float64) * 2 + 1  # (batch, rows, features)
W = torch.rand(5, generator=G, dtype=torch.float64) + 0.5
B = torch.randn(5, generator=G, dtype=torch.float64)


def ours(x, w=W, b=B):
    return normalize(x, -1, weight=w, bias=b)


def layer_norm(x, w=W, b=B):
    return F.layer_norm(x, (5,), w, b)


def loss(f):
    return lambda x, *p: (f(x, *p) ** 3 * torch.linspace(-1, 1, 5, dtype=x.dtype)).sum()


def _close(a, r):
    for p, q in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(r),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(p, q, **TOL)


TRANSFORMS = {
    "vmap": lambda f: func.vmap(f)(X),
    "grad": lambda f: func.grad(loss(f), argnums=(0, 1, 2))(X, W, B),
    "jvp": lambda f: func.jvp(f, (X, W, B), (X.cos(), W.sin(), B.cos())),
    "jacrev": lambda f: func.jacrev(f, argnums=(0, 1))(X[0], W, B),
    "jacfwd": lambda f: func.jacfwd(f, argnums=(0, 2))(X[0], W, B),
    "vmap(grad)": lambda f: func.vmap(func.grad(loss(f)))(X),
    "hessian": lambda f: func.hessian(loss(f))(X[0, :2]),
    "vmap(jvp)": lambda f: func.vmap(lambda x, t: func.jvp(f, (x,), (t,)))(X, X.sin()),
    "ensemble": lambda f: func.vmap(f, in_dims=(None, 0, 0))(X[0], W * X[:, 0], B * X[:, 1]),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_matches_layer_norm(name):
    _close(TRANSFORMS[name](ours), TRANSFORMS[name](layer_norm))


def test_vmap_runs_the_kernels_once_on_the_batched_layout():
    from normgrad import use_kernels

    with testing.record_paths() as seen, use_kernels(True):
        func.vmap(ours)(X)
        func.vmap(ours, in_dims=1)(X)
    assert [d for d, _ in seen] == ["forward", "forward"]
    assert all(p != "generic" for _, p in seen)


def test_batch_norm_layout_and_module_through_functional_call():
    x = torch.randn(4, 3, 2, 3, generator=G, dtype=torch.float64)
    m = MeanVarNorm((3, 1, 1), axes=(0, 2, 3), dtype=torch.float64)
    params = {"weight": torch.rand(3, 1, 1, dtype=torch.float64) + 0.5,
              "bias": torch.randn(3, 1, 1, dtype=torch.float64)}  # fmt: skip

    def f(p, x):
        return (func.functional_call(m, p, (x,)) ** 2).sum()

    def ref(p, x):
        w, b = p["weight"].view(3), p["bias"].view(3)
        return (F.batch_norm(x, None, None, w, b, training=True) ** 2).sum()

    _close(func.grad(f)(params, x), func.grad(ref)(params, x))
    _close(func.jacrev(f, argnums=1)(params, x), func.jacrev(ref, argnums=1)(params, x))
    # per-sample-model ensembling: a stack of parameter sets over one input
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    _close(
        func.vmap(func.grad(f), in_dims=(0, None))(stacked, x),
        func.vmap(func.grad(ref), in_dims=(0, None))(stacked, x),
    )
