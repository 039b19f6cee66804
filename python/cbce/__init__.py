"""cbce for Python: the class-balanced cross-entropy loss of libcbce, through ctypes.

Tensors go in and out through DLPack (`__dlpack__`), without copies: NumPy arrays, and the
tensors of PyTorch, CuPy or JAX. Methods that return arrays return NumPy arrays.

    import numpy as np
    import cbce

    loss = cbce.ClassBalancedLoss(num_classes=3)
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], dtype=np.float32)
    result = loss.forward(logits, np.array([0, 2]), grad=True)
    result.loss, result.grad, result.weights, result.weight_sum

Failures raise CbceError, whose `status` is the library's status and whose message is the
library's own, naming what was wrong. The library is found as `cbce._ffi` describes (first the
CBCE_LIBRARY environment variable). PyTorch's autograd is in `cbce.pytorch`.
"""

import ctypes
import enum
import operator
from typing import NamedTuple, Optional

import numpy as np

from . import _ffi
from ._dlpack import borrow

__all__ = [
    "ClassBalancedLoss",
    "CbceError",
    "ForwardResult",
    "Status",
    "cuda_available",
    "library_path",
    "version",
]

__version__ = "0.1.0"

_LIBRARY_PATH = _ffi.library_path()
_lib = _ffi.load(_LIBRARY_PATH)

REDUCTIONS = {"mean": _ffi.REDUCTION_MEAN, "sum": _ffi.REDUCTION_SUM, "none": _ffi.REDUCTION_NONE}

# numpy dtypes of the logits' DLPack (code, bits); numpy has no bfloat16.
_NUMPY_DTYPES = {
    (_ffi.DTYPE_FLOAT, 16): np.float16,
    (_ffi.DTYPE_FLOAT, 32): np.float32,
    (_ffi.DTYPE_FLOAT, 64): np.float64,
}


class Status(enum.IntEnum):
    """CbceStatus: the values never change meaning."""

    OK = 0
    NULL_POINTER = 1
    INVALID_CONFIG = 2
    INVALID_ARGUMENT = 3
    UNSUPPORTED_DTYPE = 4
    SHAPE_MISMATCH = 5
    INVALID_LAYOUT = 6
    LABEL_OUT_OF_RANGE = 7
    BUFFER_LENGTH = 8
    INVALID_STATE = 9
    DEVICE_MISMATCH = 10
    UNSUPPORTED = 11
    CUDA_ERROR = 12
    PANIC = 13


class CbceError(Exception):
    """A call into libcbce failed: `status` says how, the message says what was wrong."""

    def __init__(self, status, message):
        super().__init__(message)
        try:
            self.status = Status(status)
        except ValueError:
            self.status = status


def _check(status):
    if status != Status.OK:
        message = _lib.cbce_last_error_message().decode("utf-8", "replace")
        raise CbceError(status, message or _lib.cbce_status_string(status).decode())


def version():
    """The version of the loaded libcbce, for example "0.1.0"."""
    return _lib.cbce_version().decode()


def cuda_available():
    """True if the loaded libcbce was built with CUDA and a CUDA device is usable."""
    return bool(_lib.cbce_cuda_available())


def library_path():
    """The path of the libcbce this module loaded."""
    return _LIBRARY_PATH


class ForwardResult(NamedTuple):
    """What ClassBalancedLoss.forward returns."""

    #: The loss: a 0-dimensional array for "mean" and "sum", the target's shape for "none".
    loss: np.ndarray
    #: The gradient with respect to the logits, if it was asked for.
    grad: Optional[np.ndarray]
    #: The class weights the call used (float32, one per class).
    weights: np.ndarray
    #: The sum of the weights of the labels that are not ignored: the denominator of "mean".
    weight_sum: float


def _device(device):
    """A CbceDevice from "cpu", "cuda" or "cuda:N"."""
    kind, _, ordinal = str(device).partition(":")
    types = {"cpu": _ffi.DEVICE_CPU, "cuda": _ffi.DEVICE_CUDA}
    if kind not in types:
        raise ValueError(f"device {device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    return _ffi.Device(types[kind], int(ordinal or 0))


def _options(reduction, update, ignore_index, label_smoothing, grad_scale=1.0):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {sorted(REDUCTIONS)}")
    options = _lib.cbce_forward_options_default()
    options.reduction = REDUCTIONS[reduction]
    options.update_prevalences = 1 if update else 0
    options.ignore_index = operator.index(ignore_index)
    options.label_smoothing = float(label_smoothing)
    options.grad_scale = float(grad_scale)
    return options


def _vector(values, dtype, name, length):
    """`values` as a contiguous 1-D array of `dtype` (copied only if it is not one already)."""
    array = np.ascontiguousarray(values, dtype=dtype)
    if array.shape != (length,):
        raise ValueError(f"`{name}` has shape {array.shape} but ({length},) is needed")
    return array


def _pointer(array, ctype):
    return array.ctypes.data_as(ctypes.POINTER(ctype))


class ClassBalancedLoss:
    """A class-balanced cross-entropy loss: a configuration and running class prevalences.

    One object may be used by several threads at once; the library makes each update atomic.
    Release it with `close()` or a `with` block; otherwise it is released when collected.
    """

    def __init__(self, num_classes, ema_decay=0.99, min_prevalence=0.0, device="cpu"):
        num_classes = operator.index(num_classes)
        if num_classes < 0:
            raise ValueError(f"num_classes is {num_classes} but must be positive")
        config = _lib.cbce_config_default()
        config.num_classes = num_classes
        config.ema_decay = float(ema_decay)
        config.min_prevalence = float(min_prevalence)
        config.device = _device(device)
        handle = _ffi.LossPointer()
        _check(_lib.cbce_new(ctypes.byref(config), ctypes.byref(handle)))
        self._handle = handle
        self._stream = None
        self.num_classes = num_classes
        self.ema_decay = config.ema_decay
        self.min_prevalence = config.min_prevalence
        self.device = device

    def close(self):
        """Releases the library's object; any later call raises ValueError."""
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            _lib.cbce_free(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        self.close()

    def __repr__(self):
        return (
            f"ClassBalancedLoss(num_classes={self.num_classes}, ema_decay={self.ema_decay}, "
            f"min_prevalence={self.min_prevalence}, device={self.device!r})"
        )

    @property
    def handle(self):
        """The CbceLoss pointer, for calling the C functions directly."""
        if not self._handle:
            raise ValueError("the loss was closed")
        return self._handle

    @property
    def stream(self):
        """The CUDA stream a CUDA handle enqueues its work on; None: the legacy default."""
        return self._stream

    def set_stream(self, stream):
        """Has a CUDA handle enqueue its work on `stream` from now on: a CUstream or
        cudaStream_t as an int (PyTorch: `torch.cuda.current_stream().cuda_stream`), or None
        for the legacy default stream. CUDA tensors handed over later are exported for it. A
        CPU handle raises CbceError (UNSUPPORTED)."""
        _check(_lib.cbce_set_stream(self.handle, stream or None))
        self._stream = stream or None

    def synchronize(self):
        """Waits for the work a CUDA handle enqueued; raises the error of a label out of range
        that it found. Returns at once on a CPU handle."""
        _check(_lib.cbce_synchronize(self.handle))

    def _borrow(self, tensor, name, writable=False):
        # DLPack's stream value 1 is the legacy default stream.
        return borrow(tensor, name, writable, self._stream or 1)

    def update(self, target, ignore_index=_ffi.DEFAULT_IGNORE_INDEX):
        """Updates the prevalences from the labels of `target` (int64, int32 or uint8; any
        shape). Labels outside [0, C) and `ignore_index` are dropped."""
        target = self._borrow(target, "target")
        _check(_lib.cbce_update(self.handle, target.pointer, operator.index(ignore_index)))

    def class_counts(self, target, ignore_index=_ffi.DEFAULT_IGNORE_INDEX):
        """The number of labels of each class in `target` (int64), without changing the state.
        With update_from_counts, data-parallel ranks can sum their counts first."""
        target = self._borrow(target, "target")
        counts = np.empty(self.num_classes, dtype=np.int64)
        _check(
            _lib.cbce_class_counts(
                self.handle,
                target.pointer,
                operator.index(ignore_index),
                _pointer(counts, ctypes.c_int64),
                counts.size,
            )
        )
        return counts

    def update_from_counts(self, counts):
        """Updates the prevalences from per-class counts, as `update` does from the labels."""
        counts = _vector(counts, np.int64, "counts", self.num_classes)
        _check(
            _lib.cbce_update_from_counts(self.handle, _pointer(counts, ctypes.c_int64), counts.size)
        )

    def class_counts_into(self, target, counts, ignore_index=_ffi.DEFAULT_IGNORE_INDEX):
        """Writes the counts of `class_counts` into `counts`, an int64 tensor of shape (C) on
        the handle's device; on a CUDA handle it is enqueued on the handle's stream without
        waiting, so the counts can stay on the device (for example for an NCCL all-reduce)."""
        target = self._borrow(target, "target")
        counts = self._borrow(counts, "counts", writable=True)
        _check(
            _lib.cbce_class_counts_tensor(
                self.handle, target.pointer, operator.index(ignore_index), counts.pointer
            )
        )

    def update_from_counts_tensor(self, counts):
        """`update_from_counts` from an int64 tensor of shape (C) on the handle's device; on a
        CUDA handle enqueued without waiting, and bad counts are raised by the next call that
        waits."""
        counts = self._borrow(counts, "counts")
        _check(_lib.cbce_update_from_counts_tensor(self.handle, counts.pointer))

    def prevalences(self):
        """The running prevalences (float32; NaN for classes never seen)."""
        return self._class_vector(_lib.cbce_prevalences)

    def weights(self):
        """The class weights a forward call without update would use (float32)."""
        return self._class_vector(_lib.cbce_weights)

    def _class_vector(self, function):
        out = np.empty(self.num_classes, dtype=np.float32)
        _check(function(self.handle, _pointer(out, ctypes.c_float), out.size))
        return out

    def forward(
        self,
        logits,
        target,
        *,
        reduction="mean",
        update=True,
        ignore_index=_ffi.DEFAULT_IGNORE_INDEX,
        label_smoothing=0.0,
        grad=False,
        grad_scale=1.0,
    ):
        """The loss of `logits` ((C), (N, C) or (N, C, d1, ..., dk)) against `target` ((),
        (N) or (N, d1, ..., dk)), updating the prevalences first if `update`. With `grad`, also
        the gradient of `grad_scale * loss` with respect to the logits (for "none", of
        `grad_scale * loss.sum()`). Outputs are new NumPy arrays of the logits' dtype."""
        logits_in = self._borrow(logits, "logits")
        target_in = self._borrow(target, "target")
        dtype = _NUMPY_DTYPES.get(logits_in.dtype[:2])
        if dtype is None:
            raise TypeError(
                f"NumPy has no dtype for logits of DLPack type {logits_in.dtype}; use "
                "forward_into with outputs of your own (or cbce.pytorch)"
            )
        loss_out = np.empty(target_in.shape if reduction == "none" else (), dtype=dtype)
        grad_out = np.empty(logits_in.shape, dtype=dtype) if grad else None

        weights, weight_sum = self._forward(
            logits_in,
            target_in,
            loss_out,
            grad_out,
            _options(reduction, update, ignore_index, label_smoothing, grad_scale),
        )
        return ForwardResult(loss_out, grad_out, weights, weight_sum)

    def forward_into(
        self,
        logits,
        target,
        loss,
        grad=None,
        *,
        reduction="mean",
        update=True,
        ignore_index=_ffi.DEFAULT_IGNORE_INDEX,
        label_smoothing=0.0,
        grad_scale=1.0,
    ):
        """`forward` into tensors of the caller (any DLPack tensors, any strides): `loss` has
        one element for "mean" and "sum" and the target's shape for "none"; `grad`, optional,
        the logits' shape. Both have the logits' dtype. Returns (weights used, weight sum)."""
        return self._forward(
            self._borrow(logits, "logits"),
            self._borrow(target, "target"),
            loss,
            grad,
            _options(reduction, update, ignore_index, label_smoothing, grad_scale),
        )

    def _forward(self, logits, target, loss, grad, options):
        loss = self._borrow(loss, "loss", writable=True)
        grad = None if grad is None else self._borrow(grad, "grad", writable=True)
        weights = np.empty(self.num_classes, dtype=np.float32)
        weight_sum = ctypes.c_double()
        _check(
            _lib.cbce_forward(
                self.handle,
                logits.pointer,
                target.pointer,
                ctypes.byref(options),
                loss.pointer,
                None if grad is None else grad.pointer,
                _pointer(weights, ctypes.c_float),
                weights.size,
                ctypes.byref(weight_sum),
            )
        )
        return weights, weight_sum.value

    def backward(
        self,
        logits,
        target,
        grad_loss,
        weights,
        *,
        reduction="mean",
        ignore_index=_ffi.DEFAULT_IGNORE_INDEX,
        label_smoothing=0.0,
    ):
        """The gradient with respect to `logits`, as a new NumPy array, from the upstream
        gradient `grad_loss` (the logits' dtype; one element for "mean" and "sum", the target's
        shape for "none") and the `weights` the forward call used. Reads no state."""
        logits_in = self._borrow(logits, "logits")
        dtype = _NUMPY_DTYPES.get(logits_in.dtype[:2])
        if dtype is None:
            raise TypeError(f"NumPy has no dtype for logits of DLPack type {logits_in.dtype}")
        grad = np.empty(logits_in.shape, dtype=dtype)
        self._backward(
            logits_in, target, grad_loss, weights, grad, reduction, ignore_index, label_smoothing
        )
        return grad

    def backward_into(
        self,
        logits,
        target,
        grad_loss,
        weights,
        grad,
        *,
        reduction="mean",
        ignore_index=_ffi.DEFAULT_IGNORE_INDEX,
        label_smoothing=0.0,
    ):
        """`backward` into `grad`, a tensor of the caller of the logits' shape and dtype."""
        self._backward(
            self._borrow(logits, "logits"),
            target,
            grad_loss,
            weights,
            grad,
            reduction,
            ignore_index,
            label_smoothing,
        )

    def _backward(
        self, logits, target, grad_loss, weights, grad, reduction, ignore_index, label_smoothing
    ):
        target = self._borrow(target, "target")
        grad_loss = self._borrow(grad_loss, "grad_loss")
        grad = self._borrow(grad, "grad", writable=True)
        weights = _vector(weights, np.float32, "weights", self.num_classes)
        options = _options(reduction, False, ignore_index, label_smoothing)
        _check(
            _lib.cbce_backward(
                self.handle,
                logits.pointer,
                target.pointer,
                ctypes.byref(options),
                grad_loss.pointer,
                _pointer(weights, ctypes.c_float),
                weights.size,
                grad.pointer,
            )
        )

    def get_state(self):
        """The running state as bytes, for a checkpoint; set_state restores it exactly."""
        size = ctypes.c_size_t()
        _check(_lib.cbce_state_size(self.handle, ctypes.byref(size)))
        buffer = (ctypes.c_uint8 * size.value)()
        written = ctypes.c_size_t()
        _check(_lib.cbce_get_state(self.handle, buffer, size.value, ctypes.byref(written)))
        return bytes(buffer)[: written.value]

    def set_state(self, state):
        """Restores a state from get_state. A damaged state, or one for another number of
        classes, raises CbceError (INVALID_STATE) and changes nothing."""
        state = bytes(state)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        _check(_lib.cbce_set_state(self.handle, buffer, len(state)))

    def reset(self):
        """Forgets every update: all classes unseen."""
        _check(_lib.cbce_reset(self.handle))
