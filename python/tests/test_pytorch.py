"""Tests of cbce.pytorch: the autograd Function's values and gradients against PyTorch's own
autograd of the reference formula (F.cross_entropy with the same class weights), numerical
gradients, and the module against the reference class over many steps. Skipped, with the reason
shown, where PyTorch cannot be imported."""

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed: the torch.autograd wrapper is not tested here"
)
import torch.nn.functional as F  # noqa: E402

import cbce  # noqa: E402
import numpy_reference as reference  # noqa: E402
from cbce.pytorch import (  # noqa: E402
    ClassBalancedCrossEntropyFunction,
    ClassBalancedCrossEntropyLoss,
)

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=0)}


class ReferenceLoss:
    """The reference class's behaviour (../shared/reference/SEMANTICS.md): the running state and
    weights of numpy_reference, and PyTorch's F.cross_entropy with those weights."""

    def __init__(self, num_classes, ema_decay):
        self.num_classes = num_classes
        self.ema_decay = ema_decay
        self.prevalences = np.full(num_classes, np.nan)

    def __call__(self, logits, target, **kwargs):
        counts = reference.counts_of(target.numpy(), self.num_classes, kwargs["ignore_index"])
        self.prevalences = reference.update(self.prevalences, counts, self.ema_decay)
        weights = torch.from_numpy(reference.weights_of(self.prevalences)).to(logits.dtype)
        return F.cross_entropy(logits, target.long(), weight=weights, **kwargs), weights


def problem(shape, num_classes, dtype=torch.float32, ignored=0.2, seed=0, ignore_index=-100):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator, dtype=dtype)
    target_shape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, num_classes, target_shape, generator=generator)
    drop = torch.rand(target_shape, generator=generator) < ignored
    return logits, torch.where(drop, torch.full_like(target, ignore_index), target)


def apply(logits, target, loss, reduction="mean", ignore_index=-100, smoothing=0.0, update=True):
    return ClassBalancedCrossEntropyFunction.apply(
        logits, target, loss, reduction, ignore_index, smoothing, update
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "shape, smoothing", [((7,), 0.0), ((24, 5), 0.0), ((24, 5), 0.15), ((2, 4, 6, 5), 0.1)]
)
def test_gradients_match_torch_autograd(dtype, reduction, shape, smoothing):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    logits, target = problem(shape, num_classes, dtype, seed=len(shape))
    loss = cbce.ClassBalancedLoss(num_classes, ema_decay=0.6)
    loss.update(torch.randint(0, 2, (30,)).numpy())

    ours = logits.clone().requires_grad_()
    value, weights = apply(ours, target, loss, reduction, smoothing=smoothing)
    theirs = logits.clone().requires_grad_()
    expected = F.cross_entropy(
        theirs, target, weight=weights.to(dtype), reduction=reduction, label_smoothing=smoothing
    )
    upstream = torch.randn(expected.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    (value * upstream).sum().backward()
    (expected * upstream).sum().backward()

    assert value.dtype == dtype and value.shape == expected.shape
    torch.testing.assert_close(value, expected, equal_nan=True, **TOLERANCES[dtype])
    torch.testing.assert_close(ours.grad, theirs.grad, **TOLERANCES[dtype])


def test_numerical_gradients():
    logits, target = problem((6, 4, 3), 4, torch.float64, seed=3)
    loss = cbce.ClassBalancedLoss(4)
    loss.update(target.numpy())
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda x: apply(x, target, loss, reduction, smoothing=0.1, update=False)[0],
            (logits.clone().requires_grad_(),),
        )


def test_layouts_and_dtypes():
    logits, target = problem((2, 5, 4, 6), 5, seed=4, ignore_index=255)
    target = target.to(torch.uint8)
    loss = cbce.ClassBalancedLoss(5)
    loss.update(target.numpy(), ignore_index=255)
    expected, _ = apply(logits, target, loss, ignore_index=255, update=False)

    channels_last = logits.to(memory_format=torch.channels_last).requires_grad_()
    value, weights = apply(channels_last, target, loss, ignore_index=255, update=False)
    value.backward()
    torch.testing.assert_close(value, expected)
    theirs = logits.clone().requires_grad_()
    F.cross_entropy(theirs, target.long(), weight=weights, ignore_index=255).backward()
    torch.testing.assert_close(channels_last.grad, theirs.grad)

    half = logits.to(torch.bfloat16).requires_grad_()
    value, _ = apply(half, target, loss, ignore_index=255, update=False)
    value.backward()
    assert value.dtype == half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(value.float(), expected, rtol=2e-2, atol=2e-2)


def test_module_follows_the_reference_over_steps():
    criterion = ClassBalancedCrossEntropyLoss(6, ema_decay=0.9, ignore_index=255)
    expected_loss = ReferenceLoss(6, ema_decay=0.9)
    for step in range(25):
        logits, target = problem((32, 6), 6, seed=100 + step, ignore_index=255)
        if step < 12:  # class 5 appears only later
            target = torch.where(target == 5, torch.zeros_like(target), target)
        smoothing = 0.1 if step % 2 else 0.0
        ours = logits.clone().requires_grad_()
        theirs = logits.clone().requires_grad_()

        value, weights = criterion(
            ours, target, return_class_weights=True, label_smoothing=smoothing
        )
        expected, expected_weights = expected_loss(
            theirs, target, ignore_index=255, label_smoothing=smoothing
        )
        value.backward()
        expected.backward()

        torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            criterion.class_prevalences,
            torch.from_numpy(expected_loss.prevalences).float(),
            equal_nan=True,
        )
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_state_dict_carries_the_running_state():
    criterion = ClassBalancedCrossEntropyLoss(4, ema_decay=0.5)
    logits, target = problem((16, 4), 4, seed=7)
    criterion(logits, target)
    state = criterion.state_dict()

    resumed = ClassBalancedCrossEntropyLoss(4, ema_decay=0.5)
    assert not torch.equal(resumed.class_weights, criterion.class_weights)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.class_prevalences, criterion.class_prevalences)
    assert torch.equal(resumed.class_weights, criterion.class_weights)
    assert torch.equal(resumed(logits, target), criterion(logits, target))


def test_errors_reach_the_caller():
    criterion = ClassBalancedCrossEntropyLoss(3)
    logits = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(cbce.CbceError, match=r"label 3 at position \[1\]"):
        criterion(logits, torch.tensor([0, 3]))
    assert torch.isnan(criterion.class_prevalences).all()
    with pytest.raises(TypeError, match="unexpected"):
        criterion(logits, torch.tensor([0, 1]), weight=torch.ones(3))
