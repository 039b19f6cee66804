"""The loss as the README and the reference's semantics define it, written plainly in NumPy in
double precision, for the tests to check the library against. It shares no code with it."""

import numpy as np


def update(prevalences, counts, ema_decay):
    """One update of running prevalences (float64, NaN for unseen) from per-class counts."""
    prevalences = np.array(prevalences, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    batch = counts / total if total > 0 else np.zeros_like(counts)
    newly_seen = np.isnan(prevalences) & (counts > 0)
    prevalences[newly_seen] = 1.0 / len(prevalences)
    seen = ~np.isnan(prevalences)
    prevalences[seen] = prevalences[seen] * ema_decay + batch[seen] * (1.0 - ema_decay)
    return prevalences


def counts_of(target, num_classes, ignore_index=-100):
    labels = np.asarray(target).astype(np.int64).ravel()
    kept = labels[(labels != ignore_index) & (labels >= 0) & (labels < num_classes)]
    return np.bincount(kept, minlength=num_classes)


def weights_of(prevalences):
    """Class weights from running prevalences, in float32 as the reference computes them."""
    p = np.asarray(prevalences, dtype=np.float64).astype(np.float32)
    if np.isnan(p).all():
        p = np.ones_like(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.float32(1.0) / p
        finite = w[~np.isnan(w)]
        mean = np.float32(finite.mean())
        std = np.float32(finite.std(ddof=1)) if finite.size > 1 else np.float32(np.nan)
        w = np.where(np.isfinite(w), w, mean)
        low, high = mean - 3 * std, mean + 3 * std
        w = np.full_like(w, np.nan) if np.isnan(low) or np.isnan(high) else np.clip(w, low, high)
        w = np.where(np.isnan(w), np.float32(1.0), w)
    return (len(w) * w / w.sum(dtype=np.float64)).astype(np.float32)


def loss_and_grad(
    logits,
    target,
    weights,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    grad_output=None,
):
    """The reduced loss (or, for "none", every position's) and its gradient with respect to
    the logits (for "none", of sum(loss * grad_output), grad_output defaulting to ones)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(target).astype(np.int64)
    if x.ndim == 1:
        x, y = x[None], y[None]
    x = np.moveaxis(x, 1, -1)
    classes = x.shape[-1]
    w = np.asarray(weights, dtype=np.float64)

    kept = y != ignore_index
    labels = np.where(kept, y, 0)
    log_probabilities = x - x.max(-1, keepdims=True)
    log_probabilities -= np.log(np.exp(log_probabilities).sum(-1, keepdims=True))
    share = label_smoothing / classes + (1.0 - label_smoothing) * np.eye(classes)[labels]
    losses = -(share * w * log_probabilities).sum(-1) * kept
    grad = np.exp(log_probabilities) * (share * w).sum(-1, keepdims=True) - share * w
    grad *= kept[..., None]
    denominator = (w[labels] * kept).sum()

    if reduction == "mean":
        # With every position ignored the mean is 0/0 = NaN, and the gradient, as PyTorch's, 0.
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = losses.sum() / denominator
            grad = np.where(kept[..., None], grad / denominator, 0.0)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
        if grad_output is not None:
            grad = grad * np.asarray(grad_output, dtype=np.float64).reshape(losses.shape)[..., None]
    grad = np.moveaxis(grad, -1, 1)
    if np.asarray(logits).ndim == 1:
        grad = grad[0]
        loss = loss[0] if reduction == "none" else loss
    return loss, grad
