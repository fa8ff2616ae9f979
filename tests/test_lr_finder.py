import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vitcourse.lr_finder import RangeTestResult, lr_range_test, plot_lr_range, steepest_lr


def _regression(n=64, d=4):
    """A least-squares problem whose largest safe SGD step is known: 2 / lambda_max of the Hessian."""
    x = torch.randn(n, d) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    y = x @ torch.randn(d, 1)
    hessian = 2 * x.T @ x / n  # of mean((x w - y)^2)
    return x, y, 2 / torch.linalg.eigvalsh(hessian).max().item()


def _sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)


def test_sweep_is_geometric_and_the_model_is_restored():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(4)]  # cycled 5 times
    result = lr_range_test(model, loader, start_lr=1e-6, end_lr=1e-3, num_iter=20, progress=False,
                           diverge_factor=1e9)
    assert not result.diverged and len(result.lrs) == 20
    assert_close(torch.tensor(result.lrs), torch.logspace(-6, -3, 20, dtype=torch.float64))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.training
    assert len(result.raw_losses) == len(result.losses) == 20


def test_stops_past_the_stability_limit_of_sgd():
    x, y, limit = _regression()
    model = nn.Linear(4, 1, bias=False)
    result = lr_range_test(model, [(x, y)], optimizer=_sgd, loss_fn=nn.functional.mse_loss, start_lr=1e-4,
                           end_lr=10.0, num_iter=80, progress=False)
    assert result.diverged
    assert result.lrs[-1] > limit  # it only blew up beyond 2 / lambda_max ...
    assert result.steepest < limit  # ... and the suggestion is a stable step size
    assert result.drop > 0


def _sigmoid_drop(lrs, centre=-3.2, width=3.0):
    """2.0 falling to 0.5; its slope against log10(lr) is steepest exactly at 10**centre (where it is -1.5 * width / 4)."""
    return 2.0 - 1.5 / (1 + np.exp(-(np.log10(lrs) - centre) * width))


def test_steepest_lr_finds_the_middle_of_a_falling_curve():
    lrs = np.logspace(-6, 0, 121)
    losses = _sigmoid_drop(lrs)
    losses[-10:] = np.linspace(1.0, 8.0, 10)  # the divergent tail is ignored
    assert steepest_lr(lrs, losses) == pytest.approx(10**-3.2, rel=0.15)
    noisy = losses.copy()
    noisy[:3] = [3.0, 1.0, 2.0]  # a noisy start (few batches in the running average) is skipped
    assert steepest_lr(lrs, noisy) == pytest.approx(10**-3.2, rel=0.15)
    assert steepest_lr(lrs, noisy, skip_start=0) < 1e-5  # without the skip the noise wins


def test_steepest_point_is_not_the_minimum_when_one_lucky_drop_makes_the_minimum():
    """The bug this guards against: a slope window that ends at the minimum gives the minimum a one-sided
    difference, the slope of the drop that led into it, so a curve whose lowest point is one lucky batch
    reported its minimum as the steepest point."""
    lrs = np.logspace(-6, 0, 121)
    losses = _sigmoid_drop(lrs)
    losses[100] -= 0.3  # one point 0.3 lower: the minimum, reached by a drop steeper than the curve's own
    losses[101:] = np.linspace(1.0, 8.0, 20)  # then it diverges
    assert int(np.argmin(losses)) == 100
    x = np.log10(lrs)
    assert (losses[100] - losses[99]) / (x[100] - x[99]) < -1.5 * 3.0 / 4  # the drop into it beats the true slope
    found = steepest_lr(lrs, losses)
    assert found < lrs[100] / 10
    assert found == pytest.approx(10**-3.2, rel=0.15)


def test_steepest_point_of_a_curve_that_flattens_before_its_minimum():
    """Steepest at 10**-4, lowest at 10**-1.5 after a long plateau, then diverging: the two read-outs differ."""
    lrs = np.logspace(-6, 0, 61)
    x = np.log10(lrs)
    losses = _sigmoid_drop(lrs, centre=-4.0, width=4.0) - 0.02 * np.clip(x + 3, 0, None)  # a slight further fall
    losses[x > -1.45] = np.linspace(1.0, 30.0, int(np.sum(x > -1.45)))
    assert lrs[np.argmin(losses)] == pytest.approx(10**-1.5, rel=0.01)
    assert steepest_lr(lrs, losses) == pytest.approx(1e-4, rel=0.15)


def test_steepest_lr_on_noisy_curves():
    """Batch-to-batch noise left by the smoothing: within a factor 2 of the true steepest point, every time."""
    lrs = np.logspace(-6, 0, 121)
    rng = np.random.default_rng(0)
    for _ in range(20):
        losses = _sigmoid_drop(lrs) + rng.normal(0.0, 0.02, lrs.shape)  # the drop is 1.5, the noise 0.02
        losses[-10:] = np.linspace(1.0, 8.0, 10)
        found = steepest_lr(lrs, losses)
        assert abs(np.log10(found) + 3.2) < 0.3
        assert found < lrs[int(np.argmin(losses))]


def test_steepest_lr_ignores_a_non_finite_end():
    lrs = np.logspace(-6, 0, 121)
    losses = _sigmoid_drop(lrs)
    losses[-3:] = [50.0, np.inf, np.nan]  # a range test that stopped on an overflow
    assert steepest_lr(lrs, losses) == pytest.approx(10**-3.2, rel=0.15)


def test_steepest_lr_refuses_in_one_sentence():
    with pytest.raises(ValueError, match="equal length"):
        steepest_lr(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="equal length >= 3"):
        steepest_lr(np.array([1e-3, 1e-2]), np.array([2.0, 1.0]))
    with pytest.raises(ValueError, match="positive, finite and increasing"):
        steepest_lr(np.array([1e-3, 1e-4, 1e-2]), np.array([2.0, 1.0, 3.0]))
    rising = np.linspace(2.0, 3.0, 30)
    with pytest.raises(ValueError, match="never falls"):
        steepest_lr(np.logspace(-5, 0, 30), rising)
    with pytest.raises(ValueError, match="no finite value"):
        steepest_lr(np.logspace(-5, 0, 30), np.full(30, np.nan))
    with pytest.raises(ValueError, match="window"):
        steepest_lr(np.logspace(-5, 0, 30), np.linspace(3.0, 2.0, 30), window=0.0)


def test_plot_of_a_curve_that_never_falls_has_no_mark():
    lrs = np.logspace(-5, 0, 30)
    losses = np.linspace(2.3, 2.5, 30)
    ax = plot_lr_range(RangeTestResult(lrs, losses, losses, diverged=False))
    assert len(ax.lines) == 1  # the curve only


def test_flat_curve_has_no_drop():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
    inputs = torch.zeros(8, 3)  # no input signal: the loss cannot fall below ln 2 for balanced labels
    loader = [(inputs, torch.tensor([0, 1] * 4))]
    result = lr_range_test(model, loader, start_lr=1e-5, end_lr=1e-2, num_iter=30, progress=False)
    assert result.drop < 1e-2


def test_plot_has_log_axis_and_labels():
    result = lr_range_test(nn.Linear(3, 2), [(torch.randn(8, 3), torch.randint(0, 2, (8,)))], num_iter=10,
                           progress=False)
    ax = plot_lr_range(result, label="tiny")
    assert ax.get_xscale() == "log" and ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_plot_leaves_the_diverged_tail_out_of_view():
    lrs = np.logspace(-5, 0, 30)
    losses = np.concatenate([np.linspace(2.3, 1.5, 25), [3.0, 10.0, 40.0, 100.0, 300.0]])
    result = RangeTestResult(lrs, losses, losses, diverged=True)
    ax = plot_lr_range(result)
    low, high = ax.get_ylim()
    assert low < 1.5 and 2.3 < high < 10.0
    other = RangeTestResult(lrs, losses + 2.0, losses + 2.0, diverged=True)
    plot_lr_range(other, ax=ax)
    assert ax.get_ylim()[0] == low and 4.3 < ax.get_ylim()[1] < 12.0  # merged with the first curve's range


def test_bad_arguments():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="start_lr"):
        lr_range_test(model, [], start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="no batches"):
        lr_range_test(model, [], progress=False)
