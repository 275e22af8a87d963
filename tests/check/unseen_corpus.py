"""Mistakes this project has not seen (issue 15's target), transcribed from real code.

Each entry is a wrong backward found in a public issue, pull request, Q&A post, course note or
blog (its `source`), rewritten here in plain NumPy in our own words: a forward `f`, the wrong
backward as it was written (`wrong`), the corrected one (`fixed`), an input maker, and the kind
of finding a person would name first (docs/checker.md), or None where no name fits (then the
checker must still catch it, and say `unknown`). Only the essential formula is kept; shapes are
small so the full-mode check is fast. None of these is in tests/grad_corpus.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = 1e-5


@dataclass(frozen=True)
class Unseen:
    name: str
    source: str  # where the mistake was found (URL or repo and thread)
    f: Callable[..., Any]
    wrong: Callable[..., Any]
    fixed: Callable[..., Any]
    make: Callable[[Any], Any]  # dtype -> x (an array or a tuple of arrays)
    kind: str | None  # the first finding a person would name; None: no name fits


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _maker(seed: int, *shapes: tuple[int, ...], offset: float = 0.0) -> Callable[[Any], Any]:
    def make(dt: Any) -> Any:
        r = _rng(seed)
        xs = tuple((offset + r.standard_normal(s)).astype(dt) for s in shapes)
        return xs[0] if len(xs) == 1 else xs

    return make


# --- softmax, log-softmax, log-cumsum-exp ------------------------------------------------------


def softmax(x: Any) -> Any:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_fixed(x: Any, g: Any) -> Any:
    s = softmax(x)
    return s * (g - (g * s).sum(axis=-1, keepdims=True))


def softmax_input_for_output(x: Any, g: Any) -> Any:
    """The Jacobian written with the input where the output belongs:
    J_ij = s_i (1 - x_i) on the diagonal, -s_i x_j off it, i.e. s_i (δ_ij - x_j)."""
    s = softmax(x)
    return s * g - x * (s * g).sum(axis=-1, keepdims=True)


def log_softmax(x: Any) -> Any:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def log_softmax_fixed(x: Any, g: Any) -> Any:
    return g - np.exp(log_softmax(x)) * g.sum(axis=-1, keepdims=True)


def log_softmax_delta_as_gy(x: Any, g: Any) -> Any:
    """gy added where the Kronecker delta belongs: g + exp(y) g (reproduces the issue's
    1.31, 1.69 for x = (0.1, 0.9), gy = 1, where the truth is 0.38, -0.38)."""
    return g + np.exp(log_softmax(x)) * g


def log_softmax_dot_with_logp(x: Any, g: Any) -> Any:
    """diff_src = diff_dst - (diff_dst · dst) with dst the log-probabilities."""
    return g - (g * log_softmax(x)).sum(axis=-1, keepdims=True)


def logcumsumexp(x: Any) -> Any:
    return np.logaddexp.accumulate(x, axis=-1)


def logcumsumexp_fixed(x: Any, g: Any) -> Any:
    r = logcumsumexp(x)
    t = g * np.exp(-r)
    return np.flip(np.cumsum(np.flip(t, -1), axis=-1), -1) * np.exp(x)


def logcumsumexp_cumsum_dropped(x: Any, g: Any) -> Any:
    """grad *= exp(-result) twice, the reversed cumsum computed and discarded."""
    r = logcumsumexp(x)
    return g * np.exp(-r) * np.exp(-r) * np.exp(x)


# --- elementwise -------------------------------------------------------------------------------


def tanh_fixed(x: Any, g: Any) -> Any:
    return (1 - np.tanh(x) ** 2) * g


def tanh_one_plus(x: Any, g: Any) -> Any:
    """(tan x)' = 1 + tan² x carried over to tanh: (1 + tanh²) g."""
    return (1 + np.tanh(x) ** 2) * g


def tanh_input_for_output(x: Any, g: Any) -> Any:
    """1 - a² with a the input, in a backward that receives the input, not the output."""
    return (1 - x**2) * g


def sigmoid(x: Any) -> Any:
    return 1 / (1 + np.exp(-x))


def sigmoid_fixed(x: Any, g: Any) -> Any:
    s = sigmoid(x)
    return s * (1 - s) * g


def sigmoid_applied_twice(x: Any, g: Any) -> Any:
    """sigmoid_derivative(z) = σ(z)(1 - σ(z)) called on the output z = σ(x)."""
    z = sigmoid(sigmoid(x))
    return z * (1 - z) * g


# --- RMS normalization -------------------------------------------------------------------------


def _rms(x: Any) -> tuple[Any, Any]:
    r = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS)
    return x * r, r


def rms_w(x: Any, w: Any) -> Any:
    return _rms(x)[0] * w


def _rms_dx(x: Any, gw: Any) -> Any:
    xh, r = _rms(x)
    return r * (gw - xh * (gw * xh).mean(axis=-1, keepdims=True))


def rms_w_fixed(x: Any, w: Any, g: Any) -> Any:
    return _rms_dx(x, g * w), (g * _rms(x)[0]).sum(axis=0)


def rms_w_weight_forgotten(x: Any, w: Any, g: Any) -> Any:
    """dx from dout where dout * weight belongs."""
    return _rms_dx(x, g), (g * _rms(x)[0]).sum(axis=0)


def rms_w_dgamma_never_written(x: Any, w: Any, g: Any) -> Any:
    """grad_gamma declared but never written: the weight gets zero gradient."""
    return _rms_dx(x, g * w), np.zeros_like(w)


_PARTIAL: list[Any] = []


def rms_w_dgamma_uninitialised(x: Any, w: Any, g: Any) -> Any:
    """The partial sums of dgamma land in a buffer that is not zeroed (torch.empty): here one
    kept across calls, so each call adds to the last one's."""
    if not _PARTIAL or _PARTIAL[0].shape != np.shape(w):
        _PARTIAL[:] = [np.zeros(np.shape(w), dtype=w.dtype)]
    _PARTIAL[0] += (g * _rms(x)[0]).sum(axis=0)
    return _rms_dx(x, g * w), _PARTIAL[0].copy()


def rms_sq(x: Any) -> Any:
    return _rms(x)[0]


def rms_sq_fixed(x: Any, g: Any) -> Any:
    n = x.shape[-1]
    r = 1 / np.sqrt((x * x).mean(axis=-1) + EPS)  # one per row
    c = (g * x).sum(axis=-1)
    return r[:, None] * g - x * (r**3 * c / n)[:, None]


def rms_sq_row_term_broadcast(x: Any, g: Any) -> Any:
    """The per-row correction r³·(g·x)/n multiplied without a trailing axis: it broadcasts
    along the last axis, so element (i, j) gets row j's term (a square block)."""
    n = x.shape[-1]
    r = 1 / np.sqrt((x * x).mean(axis=-1) + EPS)
    c = (g * x).sum(axis=-1)
    return r[:, None] * g - x * (r**3 * c / n)[None, :]


def prenorm(x: Any, res: Any) -> Any:
    s = x + res
    return np.concatenate([_rms(s)[0], s], axis=-1)  # (normalized, the residual stream)


def prenorm_fixed(x: Any, res: Any, g: Any) -> Any:
    n = x.shape[-1]
    ds = _rms_dx(x + res, g[..., :n]) + g[..., n:]
    return ds, ds.copy()


def prenorm_added_before_norm(x: Any, res: Any, g: Any) -> Any:
    """dres = (dres + dout) * dnorm: the residual's gradient pushed through the norm."""
    n = x.shape[-1]
    ds = _rms_dx(x + res, g[..., :n] + g[..., n:])
    return ds, ds.copy()


# --- layer, group and batch normalization ------------------------------------------------------


def _mv(x: Any, axes: Any) -> tuple[Any, Any]:
    d = x - x.mean(axis=axes, keepdims=True)
    r = 1 / np.sqrt((d * d).mean(axis=axes, keepdims=True) + EPS)
    return d * r, r


def _mv_dx(x: Any, g: Any, axes: Any, stat_axes: Any = None) -> Any:
    """r (g - mean(g) - x̂ mean(g x̂)); the two means over `stat_axes` (default: `axes`)."""
    xh, r = _mv(x, axes)
    ax = axes if stat_axes is None else stat_axes
    return r * (g - g.mean(axis=ax, keepdims=True) - xh * (g * xh).mean(axis=ax, keepdims=True))


def layer_norm(x: Any, w: Any, b: Any) -> Any:
    return _mv(x, -1)[0] * w + b


def layer_norm_fixed(x: Any, w: Any, b: Any, g: Any) -> Any:
    xh = _mv(x, -1)[0]
    return _mv_dx(x, g * w, -1), (g * xh).sum(axis=0), g.sum(axis=0)


def layer_norm_no_backward(x: Any, w: Any, b: Any, g: Any) -> Any:
    """A fused op registered without a backward: nothing flows to any input."""
    return np.zeros_like(x), np.zeros_like(w), np.zeros_like(b)


def layer_norm_affine_cut(x: Any, w: Any, b: Any, g: Any) -> Any:
    """The output built as a new leaf: gamma and beta receive no gradient."""
    return _mv_dx(x, g * w, -1), np.zeros_like(w), np.zeros_like(b)


def group_norm(x: Any) -> Any:
    n, c = x.shape
    return _mv(x.reshape(n, 2, c // 2), -1)[0].reshape(n, c)


def group_norm_fixed(x: Any, g: Any) -> Any:
    n, c = x.shape
    return _mv_dx(x.reshape(n, 2, -1), g.reshape(n, 2, -1), -1).reshape(n, c)


def group_norm_whole_row(x: Any, g: Any) -> Any:
    """group_size defaults to the whole dimension: x̂ and 1/σ per group, the two reductions
    of the backward over the whole row."""
    n, c = x.shape
    xg, gg = x.reshape(n, 2, -1), g.reshape(n, 2, -1)
    xh, r = _mv(xg, -1)
    mean_g = gg.mean(axis=(1, 2), keepdims=True)
    mean_gx = (gg * xh).mean(axis=(1, 2), keepdims=True)
    return (r * (gg - mean_g - xh * mean_gx)).reshape(n, c)


def layer_norm_3d(x: Any) -> Any:
    return _mv(x, -1)[0]


def layer_norm_3d_fixed(x: Any, g: Any) -> Any:
    return _mv_dx(x, g, -1)


def layer_norm_3d_as_2d(x: Any, g: Any) -> Any:
    """M = input.shape[0], N = numel // M: the backward's rows are (T, C) slabs, not C rows."""
    return _mv_dx(x, g, -1, stat_axes=(1, 2))


def batch_norm(x: Any, gamma: Any) -> Any:
    return _mv(x, 0)[0] * gamma


def batch_norm_fixed(x: Any, gamma: Any, g: Any) -> Any:
    return _mv_dx(x, g * gamma, 0), (g * _mv(x, 0)[0]).sum(axis=0)


def batch_norm_dyivar_unscaled(x: Any, gamma: Any, g: Any) -> Any:
    """dy = g .* dy is done after dyivar = dy .* ivar, and dx is built from dyivar."""
    return _mv_dx(x, g, 0), (g * _mv(x, 0)[0]).sum(axis=0)


def batch_norm_staged(x: Any, gamma: Any, g: Any) -> Any:
    """The staged (computational-graph) backward, step by step; a correct one."""
    n = x.shape[0]
    mu = x.mean(axis=0)
    xmu = x - mu
    var = (xmu**2).mean(axis=0)
    sqrtvar = np.sqrt(var + EPS)
    ivar = 1 / sqrtvar
    xhat = xmu * ivar
    dxhat = g * gamma
    divar = (dxhat * xmu).sum(axis=0)
    dxmu1 = dxhat * ivar
    dvar = 0.5 / np.sqrt(var + EPS) * (-1 / sqrtvar**2 * divar)
    dxmu2 = 2 * xmu * np.ones_like(x) * dvar / n
    dmu = -(dxmu1 + dxmu2).sum(axis=0)
    return dxmu1 + dxmu2 + dmu / n, (g * xhat).sum(axis=0)


def batch_norm_dmu_zero_term_dropped(x: Any, gamma: Any, g: Any) -> Any:
    """dmu = sum(dxhat · -ivar) without dvar · mean(-2 (x - mu)): that term is identically
    zero, so this is still a correct backward (the review called it a bug)."""
    n = x.shape[0]
    xmu = x - x.mean(axis=0)
    ivar = 1 / np.sqrt((xmu**2).mean(axis=0) + EPS)
    dxhat = g * gamma
    dvar = (dxhat * xmu).sum(axis=0) * -0.5 * ivar**3
    dmu = (dxhat * -ivar).sum(axis=0)
    return dxhat * ivar + dvar * 2 * xmu / n + dmu / n, (g * xmu * ivar).sum(axis=0)


_M0 = _rng(70).standard_normal(4)
_V0 = 0.5 + _rng(71).random(4)


def bn_global_stats(x: Any) -> Any:
    """Batch norm with fixed (global) statistics: a per-column affine map."""
    return (x - _M0.astype(x.dtype)) / np.sqrt(_V0.astype(x.dtype) + EPS)


def bn_global_stats_fixed(x: Any, g: Any) -> Any:
    return g / np.sqrt(_V0.astype(x.dtype) + EPS)


def bn_global_stats_batch_backward(x: Any, g: Any) -> Any:
    """The batch-statistics backward kept although the mean and variance are constants."""
    r = 1 / np.sqrt(_V0.astype(x.dtype) + EPS)
    xh = (x - _M0.astype(x.dtype)) * r
    return r * (g - g.mean(axis=0) - xh * (g * xh).mean(axis=0))


# --- convolution -------------------------------------------------------------------------------


def conv_valid(x: Any, w: Any) -> Any:
    return np.correlate(x, w, mode="valid")  # what CNN layers call convolution


def conv_valid_fixed(x: Any, w: Any, g: Any) -> Any:
    return np.convolve(g, w, mode="full"), np.correlate(x, g, mode="valid")


def conv_valid_dw_reversed(x: Any, w: Any, g: Any) -> Any:
    """The cross-correlation for dw with its arguments in the wrong order: dw comes out
    reversed."""
    return np.convolve(g, w, mode="full"), np.correlate(x, g, mode="valid")[::-1]


_W3 = np.array([0.5, -1.0, 0.25])


def xcorr_same(x: Any) -> Any:
    return np.correlate(x, _W3.astype(x.dtype), mode="same")


def xcorr_same_fixed(x: Any, g: Any) -> Any:
    return np.convolve(g, _W3.astype(g.dtype), mode="same")


def xcorr_same_kernel_not_flipped(x: Any, g: Any) -> Any:
    """The data gradient correlated with the kernel as is, not with the kernel rotated (the
    mistake the post's "cross-correlation misnomer" section explains)."""
    return np.correlate(g, _W3.astype(g.dtype), mode="same")


# --- attention ---------------------------------------------------------------------------------


def attention(q: Any, k: Any, v: Any) -> Any:
    s = 1 / float(np.sqrt(q.shape[-1]))
    return softmax(q @ k.T * s) @ v


def _attn_parts(q: Any, k: Any, v: Any, g: Any, vdim: int | None = None) -> tuple[Any, ...]:
    s = 1 / float(np.sqrt(q.shape[-1]))
    p = softmax(q @ k.T * s)
    c = slice(None) if vdim is None else slice(0, vdim)
    dp = g[:, c] @ v[:, c].T
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return s, p, ds


def attention_fixed(q: Any, k: Any, v: Any, g: Any) -> Any:
    s, p, ds = _attn_parts(q, k, v, g)
    return ds @ k * s, ds.T @ q * s, p.T @ g


def attention_dk_unscaled(q: Any, k: Any, v: Any, g: Any) -> Any:
    """softmax_scale lost before dK is scaled: dK misses its factor 1/sqrt(d). (In the issue
    the lost scale was None and the kernel raised; this is the silent variant.)"""
    s, p, ds = _attn_parts(q, k, v, g)
    return ds @ k * s, ds.T @ q, p.T @ g


def attention_dq_v_channels_masked(q: Any, k: Any, v: Any, g: Any) -> Any:
    """backward_dq declares v and dO with qk_head_dim columns: with qk_head_dim < v_head_dim,
    value channels are masked out of dp = dO vᵀ, so dQ and dK are wrong (dV is right)."""
    s, p, ds = _attn_parts(q, k, v, g, vdim=q.shape[-1])
    return ds @ k * s, ds.T @ q * s, p.T @ g


_STALE_DO: list[Any] = []


def attention_stale_dpsum(q: Any, k: Any, v: Any, g: Any) -> Any:
    """dpsum = rowsum(O ∘ dO) read before dO is fully written: here the previous call's dO."""
    s = 1 / float(np.sqrt(q.shape[-1]))
    p = softmax(q @ k.T * s)
    o = p @ v
    stale = _STALE_DO[0] if _STALE_DO and _STALE_DO[0].shape == g.shape else np.zeros_like(g)
    _STALE_DO[:] = [g.copy()]
    dp = g @ v.T
    ds = p * (dp - (o * stale).sum(axis=-1, keepdims=True))
    return ds @ k * s, ds.T @ q * s, p.T @ g


# --- the corpus --------------------------------------------------------------------------------

U = Unseen
SO_SOFTMAX = "https://newbe.dev/numpy-calculate-the-derivative-of-the-softmax-function"
CORPUS: list[Unseen] = [
    U("softmax_input_for_output", SO_SOFTMAX, softmax, softmax_input_for_output,
      softmax_fixed, _maker(1, (3, 5)), None),
    U("log_softmax_delta_as_gy", "https://github.com/mlpack/mlpack/issues/2360", log_softmax,
      log_softmax_delta_as_gy, log_softmax_fixed, _maker(2, (3, 5)), "diagonal"),
    U("log_softmax_dot_with_logp", "https://github.com/uxlfoundation/oneDNN/issues/616",
      log_softmax, log_softmax_dot_with_logp, log_softmax_fixed, _maker(3, (3, 5)), None),
    U("logcumsumexp_cumsum_dropped", "https://github.com/pytorch/pytorch/pull/32876",
      logcumsumexp, logcumsumexp_cumsum_dropped, logcumsumexp_fixed, _maker(4, (2, 6)),
      "diagonal"),
    U("tanh_one_plus_tanh_sq", "https://github.com/gy910210/neural-network-from-scratch/issues/2",
      np.tanh, tanh_one_plus, tanh_fixed, _maker(5, (3, 4)), None),
    U("tanh_input_for_output", "https://github.com/apache/mxnet/pull/4316", np.tanh,
      tanh_input_for_output, tanh_fixed, _maker(6, (3, 4)), None),
    U("sigmoid_applied_twice",
      "https://math.techqa.club/calculating-derivatives-for-backpropagation-in-2-layer-neural-network-4158072",
      sigmoid, sigmoid_applied_twice, sigmoid_fixed, _maker(7, (3, 4)), None),
    U("rmsnorm_weight_forgotten", "https://github.com/karpathy/llm.c/pull/763", rms_w,
      rms_w_weight_forgotten, rms_w_fixed, _maker(8, (3, 6), (6,), offset=0.5), None),
    U("rmsnorm_dgamma_never_written", "https://github.com/paiml/trueno/pull/178", rms_w,
      rms_w_dgamma_never_written, rms_w_fixed, _maker(9, (3, 6), (6,), offset=0.5), "zero"),
    U("rmsnorm_dgamma_uninitialised", "https://github.com/flagos-ai/FlagGems/pull/1084", rms_w,
      rms_w_dgamma_uninitialised, rms_w_fixed, _maker(10, (3, 6), (6,), offset=0.5),
      "nondeterministic"),
    U("rmsnorm_row_term_broadcast", "https://github.com/BobMcDear/attorch/issues/17", rms_sq,
      rms_sq_row_term_broadcast, rms_sq_fixed, _maker(11, (4, 4), offset=0.5), None),
    U("rms_prenorm_residual_through_norm", "https://github.com/Dao-AILab/quack/pull/53",
      prenorm, prenorm_added_before_norm, prenorm_fixed, _maker(12, (2, 4), (2, 4)), None),
    U("layer_norm_no_backward", "https://github.com/huggingface/candle/pull/3613", layer_norm,
      layer_norm_no_backward, layer_norm_fixed, _maker(13, (3, 5), (5,), (5,)), "zero"),
    U("layer_norm_affine_cut", "https://github.com/paiml/aprender/pull/2196", layer_norm,
      layer_norm_affine_cut, layer_norm_fixed, _maker(14, (3, 5), (5,), (5,)), "zero"),
    U("group_norm_whole_row", "https://github.com/state-spaces/mamba/pull/547", group_norm,
      group_norm_whole_row, group_norm_fixed, _maker(15, (2, 8)), None),
    U("layer_norm_3d_as_2d", "https://github.com/flagos-ai/FlagGems/issues/5392", layer_norm_3d,
      layer_norm_3d_as_2d, layer_norm_3d_fixed, _maker(16, (2, 3, 4)), None),
    U("batch_norm_dyivar_unscaled", "https://github.com/denizyuret/Knet.jl/issues/288",
      batch_norm, batch_norm_dyivar_unscaled, batch_norm_fixed, _maker(17, (5, 3), (3,)), None),
    U("bn_global_stats_batch_backward", "https://github.com/apache/mxnet/pull/1630",
      bn_global_stats, bn_global_stats_batch_backward, bn_global_stats_fixed,
      _maker(18, (5, 4)), "missing_term"),
    U("conv_dw_reversed",
      "https://end-to-end-machine-learning.teachable.com/courses/322-convolutional-neural-networks-in-two-dimensions/lectures/24726662",
      conv_valid, conv_valid_dw_reversed, conv_valid_fixed, _maker(19, (20,), (3,)), "partial"),
    U("xcorr_kernel_not_flipped", "https://namrapatel.github.io/blog/conv-backprop.html",
      xcorr_same, xcorr_same_kernel_not_flipped, xcorr_same_fixed, _maker(20, (12,)),
      "transpose"),
    U("attention_dk_unscaled", "https://github.com/Dao-AILab/flash-attention/issues/2651",
      attention, attention_dk_unscaled, attention_fixed, _maker(21, (3, 4), (5, 4), (5, 4)),
      "scale"),
    U("attention_dq_v_channels_masked",
      "https://github.com/XunhaoLai/native-sparse-attention-triton/issues/27", attention,
      attention_dq_v_channels_masked, attention_fixed, _maker(22, (3, 2), (4, 2), (4, 3)), None),
    U("attention_stale_dpsum", "https://github.com/Dao-AILab/flash-attention/pull/2481",
      attention, attention_stale_dpsum, attention_fixed, _maker(23, (3, 4), (4, 4), (4, 4)),
      "nondeterministic"),
]  # fmt: skip

# Correct backwards from the same sources, written differently from the fixes above.
EXTRA_CORRECT: list[Unseen] = [
    U("batch_norm_staged",
      "https://kratzert.github.io/2016/02/12/understanding-the-gradient-flow-through-the-batch-normalization-layer.html",
      batch_norm, batch_norm_staged, batch_norm_staged, _maker(24, (5, 3), (3,)), "ok"),
    U("batch_norm_dmu_zero_term_dropped", "https://github.com/mlpack/mlpack/pull/2474",
      batch_norm, batch_norm_dmu_zero_term_dropped, batch_norm_dmu_zero_term_dropped,
      _maker(25, (5, 3), (3,)), "ok"),
]  # fmt: skip
