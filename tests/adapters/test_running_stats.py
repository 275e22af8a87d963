"""Running statistics of `normgrad.torch.MeanVarNorm` against `torch.nn.BatchNorm2d`: several
training steps (buffers, outputs, gradients), then eval."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from normgrad import NormgradError  # noqa: E402
from normgrad.torch import MeanVarNorm  # noqa: E402


def _pair(momentum, c=3):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(c, momentum=momentum).double()
    mv = MeanVarNorm((c, 1, 1), axes=(0, 2, 3), track_running_stats=True, momentum=momentum)
    mv = mv.double()
    with torch.no_grad():
        w, b = torch.randn(c).double(), torch.randn(c).double()
        bn.weight.copy_(w)
        bn.bias.copy_(b)
        mv.weight.copy_(w.reshape(c, 1, 1))
        mv.bias.copy_(b.reshape(c, 1, 1))
    return bn, mv


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_matches_batchnorm2d_over_training_steps_then_eval(momentum, compiled):
    bn, mv = _pair(momentum)
    if compiled:  # one graph: the update is the custom op normgrad::update_running_stats
        torch._dynamo.reset()
        mv = torch.compile(mv, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = (torch.randn(4, 3, 5, 2, generator=gen) * (step + 1) + step).double()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), mv(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
        dy = torch.randn(x.shape, generator=gen).double()
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mv.running_mean.reshape(-1), bn.running_mean, rtol=1e-13, atol=0)
        torch.testing.assert_close(mv.running_var.reshape(-1), bn.running_var, rtol=1e-13, atol=0)
        assert int(mv.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
    bn.eval()
    mv.eval()
    x = torch.randn(2, 3, 5, 2, generator=gen).double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = bn(xa), mv(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-12, atol=1e-12)
    before = mv.running_mean.clone()
    mv(x)
    assert torch.equal(mv.running_mean, before)  # eval leaves the buffers alone


def test_eval_gradient_treats_running_statistics_as_constants():
    _, mv = _pair(0.1)
    mv(torch.randn(4, 3, 2, 2).double())
    mv.eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mv, (x,))
    expected = (mv.weight / torch.sqrt(mv.running_var + mv.eps)).expand_as(x)
    mv(x).sum().backward()
    torch.testing.assert_close(x.grad, expected)


def test_buffers_are_in_the_state_dict_and_absent_without_tracking():
    _, mv = _pair(0.1)
    keys = set(mv.state_dict())
    assert {"running_mean", "running_var", "num_batches_tracked"} <= keys
    plain = MeanVarNorm((3, 1, 1), axes=(0, 2, 3))
    assert plain.running_mean is None and "running_mean" not in plain.state_dict()
    plain.eval()  # without tracking, eval still normalizes by the batch
    x = torch.randn(4, 3, 2, 2)
    y = plain(x)
    np.testing.assert_allclose(y.mean(dim=(0, 2, 3)).detach().numpy(), 0.0, atol=1e-6)


def test_bad_momentum_and_groups_that_do_not_fit_are_refused():
    with pytest.raises(NormgradError, match="momentum must be a number in"):
        MeanVarNorm((3, 1, 1), axes=(0, 2, 3), track_running_stats=True, momentum=2.0)
    mv = MeanVarNorm(4, axes=-1, track_running_stats=True)
    with pytest.raises(NormgradError, match="one value per group"):
        mv(torch.randn(2, 3, 4))
