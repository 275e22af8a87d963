"""Masked calls (`mask=`, `nan_policy="omit"`) of normgrad.torch under torch.compile: the custom
ops `normgrad::masked_forward` / `masked_backward` stay in one graph (fullgraph, no break),
against masked statistics written in plain torch ops and differentiated by torch's autograd."""

import pytest

torch = pytest.importorskip("torch")

from normgrad import NormgradError  # noqa: E402
from normgrad.torch import MeanVarNorm, normalize  # noqa: E402


def _masked_reference(x, axes, mask, w, b, eps=1e-5, ddof=0):
    """Masked mean-variance normalization in plain torch ops (Flax's rule: statistics over the
    counted elements, every element normalized by them)."""
    m = mask.to(x.dtype).expand_as(x)
    n = m.sum(axes, keepdim=True)
    mean = (m * x).sum(axes, keepdim=True) / n
    var = (m * (x - mean) ** 2).sum(axes, keepdim=True) / (n - ddof)
    y = (x - mean) / torch.sqrt(var + eps)
    return y * w + b


def _compiled(f, backend):
    """`f` compiled with fullgraph=True, and the FX graphs Dynamo made of it."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(f, backend=record if backend == "record" else backend, fullgraph=True), (
        graphs
    )


def _inputs(shape, axes, pshape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    w = (torch.rand(pshape, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(pshape, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(shape, generator=g) < 0.7
    mask[(slice(None),) * (len(shape) - 1) + (slice(0, 2),)] = True  # no empty group
    return x, w, b, mask


@pytest.mark.parametrize(
    ("shape", "axes", "pshape", "ddof"),
    [((6, 9), -1, (9,), 0), ((4, 3, 5, 5), (0, 2, 3), (3, 1, 1), 1), ((3, 8), None, (3, 8), 0)],
    ids=["rows", "channels", "whole"],
)
@pytest.mark.parametrize("backend", ["record", "inductor"])
def test_masked_call_compiles_fullgraph_and_matches_autograd(shape, axes, pshape, ddof, backend):
    x, w, b, mask = _inputs(shape, axes, pshape)

    def f(x, w, b, mask):
        return normalize(x, axes, ddof=ddof, weight=w, bias=b, mask=mask)

    cf, graphs = _compiled(f, backend)
    y = cf(x, w, b, mask)
    dims = tuple(range(x.ndim)) if axes is None else axes
    ref = _masked_reference(x, dims, mask, w, b, ddof=ddof)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(ref, (x, w, b), dy)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    if backend == "record":
        assert any("normgrad.masked_forward" in g for g in graphs), graphs


def test_nan_omit_compiles_fullgraph():
    x = _inputs((5, 7), -1, (7,))[0]
    xn = x.detach().clone()
    xn[1, 3] = xn[4, 0] = float("nan")
    xn.requires_grad_(True)
    cf, graphs = _compiled(lambda t: normalize(t, -1, nan_policy="omit"), "record")
    y = cf(xn)
    ref = normalize(xn, -1, nan_policy="omit")  # eager: checked against scipy elsewhere
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(y[1, 3]) and torch.isnan(y[4, 0]) and torch.isfinite(y[0]).all()
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, xn, torch.nan_to_num(dy))
    (g0,) = torch.autograd.grad(ref, xn, torch.nan_to_num(dy))
    torch.testing.assert_close(g, g0, rtol=0, atol=0, equal_nan=True)
    assert any("normgrad.masked_forward" in g for g in graphs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_compiled_masked_call_keeps_the_eager_dtype(dtype):
    x = (torch.randn(4, 6, dtype=torch.float64) * 3).to(dtype)
    mask = torch.rand(4, 6) < 0.8
    mask[:, :2] = True
    cf, _ = _compiled(lambda t, m: normalize(t, -1, mask=m), "aot_eager")
    y, y0 = cf(x, mask), normalize(x, -1, mask=mask)
    assert y.dtype == y0.dtype
    torch.testing.assert_close(y, y0, rtol=0, atol=0)


def test_module_with_a_mask_and_running_stats_compiles():
    m = MeanVarNorm(6, axes=0, track_running_stats=True, dtype=torch.float64)
    m_eager = MeanVarNorm(6, axes=0, track_running_stats=True, dtype=torch.float64)
    cm, _ = _compiled(m, "aot_eager")
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        mask = torch.rand(8, 1, generator=g) < 0.75
        mask[:2] = True
        torch.testing.assert_close(cm(x, mask), m_eager(x, mask), rtol=0, atol=1e-14)
    torch.testing.assert_close(m.running_mean, m_eager.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(m.running_var, m_eager.running_var, rtol=0, atol=1e-14)


def test_a_bad_mask_under_compile_is_a_normgrad_error():
    x = torch.randn(4, 6)
    cf, _ = _compiled(lambda t, m: normalize(t, -1, mask=m), "aot_eager")
    with pytest.raises(NormgradError, match=r"mask of shape \(5,\) does not broadcast"):
        cf(x, torch.ones(5, dtype=torch.bool))


def test_running_stats_of_a_group_with_one_counted_element_is_refused_under_compile():
    m = MeanVarNorm(6, axes=0, track_running_stats=True, dtype=torch.float64)
    cm, _ = _compiled(m, "aot_eager")
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[1:, 4] = False  # group 4: one counted element, no unbiased variance
    with pytest.raises(NormgradError, match=r"more than one counted element.*at least 1"):
        cm(torch.randn(8, 6, dtype=torch.float64), mask)
    assert int(m.num_batches_tracked) == 0  # refused before any buffer moved
