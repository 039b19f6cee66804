"""A minimal ctypes binding of libcbce for the GPU checks: the structs of include/cbce.h, the
functions the checks call, and descriptors for PyTorch tensors (any device) and NumPy arrays.

It is deliberately separate from the package under python/, so that the GPU checks depend on
nothing but the shared library and the header's layout.
"""

import ctypes
import ctypes.util

DEVICE_CPU = 1
DEVICE_CUDA = 2
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
STATUS_OK = 0


class Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", Device),
        ("ndim", ctypes.c_int32),
        ("dtype", DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class Config(ctypes.Structure):
    _fields_ = [
        ("num_classes", ctypes.c_uint64),
        ("ema_decay", ctypes.c_double),
        ("min_prevalence", ctypes.c_double),
        ("device", Device),
    ]


class ForwardOptions(ctypes.Structure):
    _fields_ = [
        ("reduction", ctypes.c_int32),
        ("update_prevalences", ctypes.c_int32),
        ("ignore_index", ctypes.c_int64),
        ("label_smoothing", ctypes.c_double),
        ("grad_scale", ctypes.c_double),
    ]


class CbceError(RuntimeError):
    pass


def load(path):
    lib = ctypes.CDLL(path)
    p = ctypes.POINTER
    lib.cbce_last_error_message.restype = ctypes.c_char_p
    lib.cbce_cuda_available.restype = ctypes.c_int32
    lib.cbce_config_default.restype = Config
    lib.cbce_forward_options_default.restype = ForwardOptions
    signatures = {
        "cbce_new": [p(Config), p(ctypes.c_void_p)],
        "cbce_free": [ctypes.c_void_p],
        "cbce_update": [ctypes.c_void_p, p(Tensor), ctypes.c_int64],
        "cbce_prevalences": [ctypes.c_void_p, p(ctypes.c_float), ctypes.c_size_t],
        "cbce_weights": [ctypes.c_void_p, p(ctypes.c_float), ctypes.c_size_t],
        "cbce_forward": [
            ctypes.c_void_p, p(Tensor), p(Tensor), p(ForwardOptions), p(Tensor), p(Tensor),
            p(ctypes.c_float), ctypes.c_size_t, p(ctypes.c_double),
        ],
        "cbce_backward": [
            ctypes.c_void_p, p(Tensor), p(Tensor), p(ForwardOptions), p(Tensor),
            p(ctypes.c_float), ctypes.c_size_t, p(Tensor),
        ],
        "cbce_set_stream": [ctypes.c_void_p, ctypes.c_void_p],
        "cbce_synchronize": [ctypes.c_void_p],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = None if name == "cbce_free" else ctypes.c_int32
    return lib


class Loss:
    """A handle; every failing call raises CbceError with the library's message."""

    def __init__(self, lib, num_classes, ema_decay=0.99, device=(DEVICE_CPU, 0)):
        self.lib = lib
        self.num_classes = num_classes
        config = lib.cbce_config_default()
        config.num_classes = num_classes
        config.ema_decay = ema_decay
        config.device = Device(*device)
        self.handle = ctypes.c_void_p()
        self.check("cbce_new", lib.cbce_new(ctypes.byref(config), ctypes.byref(self.handle)))

    def check(self, what, status):
        if status != STATUS_OK:
            message = self.lib.cbce_last_error_message().decode()
            raise CbceError(f"{what}: status {status}: {message}")

    def close(self):
        if self.handle:
            self.lib.cbce_free(self.handle)
            self.handle = ctypes.c_void_p()

    def set_stream(self, stream):
        self.check("cbce_set_stream", self.lib.cbce_set_stream(self.handle, ctypes.c_void_p(stream)))

    def synchronize(self):
        self.check("cbce_synchronize", self.lib.cbce_synchronize(self.handle))

    def update(self, target, ignore_index=-100):
        self.check("cbce_update", self.lib.cbce_update(self.handle, ctypes.byref(target.tensor), ignore_index))

    def _floats(self, function):
        out = (ctypes.c_float * self.num_classes)()
        self.check(function.__name__, function(self.handle, out, self.num_classes))
        return list(out)

    def prevalences(self):
        return self._floats(self.lib.cbce_prevalences)

    def weights(self):
        return self._floats(self.lib.cbce_weights)

    def forward(self, logits, target, options, loss_out, grad=None, with_weights=False):
        """Returns the weights used when `with_weights` (which makes a CUDA call wait)."""
        weights = (ctypes.c_float * self.num_classes)() if with_weights else None
        status = self.lib.cbce_forward(
            self.handle, ctypes.byref(logits.tensor), ctypes.byref(target.tensor), ctypes.byref(options),
            ctypes.byref(loss_out.tensor), ctypes.byref(grad.tensor) if grad is not None else None,
            weights, self.num_classes if with_weights else 0, None,
        )
        self.check("cbce_forward", status)
        return list(weights) if with_weights else None

    def backward(self, logits, target, options, grad_loss, weights, grad):
        array = (ctypes.c_float * self.num_classes)(*weights)
        status = self.lib.cbce_backward(
            self.handle, ctypes.byref(logits.tensor), ctypes.byref(target.tensor), ctypes.byref(options),
            ctypes.byref(grad_loss.tensor), array, self.num_classes, ctypes.byref(grad.tensor),
        )
        self.check("cbce_backward", status)


def options(lib, reduction="mean", ignore_index=-100, label_smoothing=0.0, update=True, grad_scale=1.0):
    value = lib.cbce_forward_options_default()
    value.reduction = REDUCTIONS[reduction]
    value.update_prevalences = 1 if update else 0
    value.ignore_index = ignore_index
    value.label_smoothing = label_smoothing
    value.grad_scale = grad_scale
    return value


class Described:
    """A descriptor with the shape and stride arrays it points to, kept alive together."""

    def __init__(self, data, device, dtype, shape, strides, keep):
        self.shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.strides = (ctypes.c_int64 * max(len(strides), 1))(*strides)
        self.keep = keep
        self.tensor = Tensor(
            data or None, device, len(shape), dtype,
            ctypes.cast(self.shape, ctypes.POINTER(ctypes.c_int64)),
            ctypes.cast(self.strides, ctypes.POINTER(ctypes.c_int64)), 0,
        )


def _dtype(name):
    codes = {
        "float32": (2, 32), "float64": (2, 64), "float16": (2, 16), "bfloat16": (4, 16),
        "int64": (0, 64), "int32": (0, 32), "uint8": (1, 8),
    }
    code, bits = codes[name]
    return DataType(code, bits, 1)


def from_torch(tensor):
    """A descriptor of a PyTorch tensor (CPU or CUDA), without a copy."""
    name = str(tensor.dtype).replace("torch.", "")
    if tensor.is_cuda:
        device = Device(DEVICE_CUDA, tensor.device.index or 0)
    else:
        device = Device(DEVICE_CPU, 0)
    return Described(tensor.data_ptr(), device, _dtype(name), list(tensor.shape), list(tensor.stride()), tensor)


def from_numpy(array):
    """A descriptor of a NumPy array, without a copy."""
    strides = [s // array.itemsize for s in array.strides]
    return Described(array.ctypes.data, Device(DEVICE_CPU, 0), _dtype(str(array.dtype)), list(array.shape), strides, array)
