"""PyTorch autograd over libcbce.

`ClassBalancedCrossEntropyFunction` is a torch.autograd.Function: its forward computes the loss
with cbce_forward and keeps the class weights it used; its backward computes the gradient with
cbce_backward from those weights and the upstream gradient. Tensors reach the library through
DLPack, without copies, in their own dtype (float32, float64, float16 or bfloat16) and layout.
A CUDA handle (device="cuda") enqueues its work on PyTorch's current stream; the forward call
waits for it, since the weights it used come back to the host for the backward call.

`ClassBalancedCrossEntropyLoss` is the nn.Module around it, with the interface of the reference
(`ClassBalancedCrossEntropyLoss` of vision-architectures): `forward(input, target,
update_class_prevalences=True, return_class_weights=False, **kwargs)`. Its running state is
part of its state_dict, so checkpoints carry it.

    criterion = ClassBalancedCrossEntropyLoss(num_classes=19, ignore_index=255)
    loss = criterion(logits, masks)
    loss.backward()
"""

import torch

from . import ClassBalancedLoss, REDUCTIONS, _ffi


def _follow_torch_stream(loss, tensor):
    """Has a CUDA handle enqueue its work on PyTorch's current stream of the tensor's device,
    so that it is ordered with PyTorch's own work without waiting."""
    if tensor.is_cuda:
        stream = torch.cuda.current_stream(tensor.device).cuda_stream
        if stream != (loss.stream or 0):
            loss.set_stream(stream)


class ClassBalancedCrossEntropyFunction(torch.autograd.Function):
    """apply(logits, target, loss, reduction, ignore_index, label_smoothing, update) returns
    (the loss, the class weights used); only the loss has a gradient, and only for `logits`.
    `loss` is a cbce.ClassBalancedLoss."""

    @staticmethod
    def forward(ctx, logits, target, loss, reduction, ignore_index, label_smoothing, update):
        logits = logits.detach()
        _follow_torch_stream(loss, logits)
        out = logits.new_empty(target.shape if reduction == "none" else ())
        weights, _ = loss.forward_into(
            logits,
            target,
            out,
            reduction=reduction,
            update=update,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
        ctx.save_for_backward(logits, target)
        ctx.loss = loss
        ctx.weights = weights
        ctx.options = dict(
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing
        )
        weights = torch.from_numpy(weights).to(logits.device)
        ctx.mark_non_differentiable(weights)
        return out, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_weights):
        grad = None
        if ctx.needs_input_grad[0]:
            logits, target = ctx.saved_tensors
            _follow_torch_stream(ctx.loss, logits)
            grad = torch.empty_like(logits)
            ctx.loss.backward_into(
                logits, target, grad_out.detach(), ctx.weights, grad, **ctx.options
            )
        return grad, None, None, None, None, None, None


class ClassBalancedCrossEntropyLoss(torch.nn.Module):
    """Cross-entropy whose class weights are the inverse of running class prevalences.

    `reduction`, `ignore_index` and `label_smoothing` are the defaults of each call, which may
    override them as keyword arguments, as F.cross_entropy's.
    """

    def __init__(
        self,
        num_classes,
        ema_decay=0.99,
        min_prevalence=0.0,
        reduction="mean",
        ignore_index=_ffi.DEFAULT_IGNORE_INDEX,
        label_smoothing=0.0,
        device="cpu",
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction {reduction!r} is not one of {sorted(REDUCTIONS)}")
        self.loss = ClassBalancedLoss(num_classes, ema_decay, min_prevalence, device)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(
        self, input, target, update_class_prevalences=True, return_class_weights=False, **kwargs
    ):
        unknown = set(kwargs) - {"reduction", "ignore_index", "label_smoothing"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        value, weights = ClassBalancedCrossEntropyFunction.apply(
            input,
            target,
            self.loss,
            kwargs.get("reduction", self.reduction),
            kwargs.get("ignore_index", self.ignore_index),
            kwargs.get("label_smoothing", self.label_smoothing),
            update_class_prevalences,
        )
        return (value, weights) if return_class_weights else value

    @property
    def class_prevalences(self):
        """The running prevalences (NaN for classes never seen)."""
        return torch.from_numpy(self.loss.prevalences())

    @property
    def class_weights(self):
        """The weights a call without update would use."""
        return torch.from_numpy(self.loss.weights())

    def reset(self):
        """Forgets every update."""
        self.loss.reset()

    def get_extra_state(self):
        return torch.frombuffer(bytearray(self.loss.get_state()), dtype=torch.uint8)

    def set_extra_state(self, state):
        self.loss.set_state(state.cpu().numpy().tobytes())

    def extra_repr(self):
        return (
            f"num_classes={self.loss.num_classes}, ema_decay={self.loss.ema_decay}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}"
        )
