"""The C interface of libcbce for ctypes: the structs of cbce.h, where the library is found, and
the prototype (argtypes and restype) of every exported function.

The library is the first of: the file that the environment variable CBCE_LIBRARY names; the
build output of the repository this package sits in (target/release/libcbce.so); the system's
libcbce (ctypes.util.find_library, which searches the linker's paths).
"""

import ctypes
import ctypes.util
import os
import pathlib
from ctypes import (
    POINTER,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint64,
    c_void_p,
)

REDUCTION_MEAN = 0
REDUCTION_SUM = 1
REDUCTION_NONE = 2

DEVICE_CPU = 1
DEVICE_CUDA = 2
DEVICE_CUDA_MANAGED = 13

DTYPE_INT = 0
DTYPE_UINT = 1
DTYPE_FLOAT = 2
DTYPE_BFLOAT = 4

DEFAULT_IGNORE_INDEX = -100


class Device(ctypes.Structure):
    """CbceDevice, laid out as DLPack's DLDevice."""

    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DataType(ctypes.Structure):
    """CbceDataType, laid out as DLPack's DLDataType."""

    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class Tensor(ctypes.Structure):
    """CbceTensor, laid out as DLPack's DLTensor."""

    _fields_ = [
        ("data", c_void_p),
        ("device", Device),
        ("ndim", c_int32),
        ("dtype", DataType),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


class Config(ctypes.Structure):
    """CbceConfig."""

    _fields_ = [
        ("num_classes", c_uint64),
        ("ema_decay", c_double),
        ("min_prevalence", c_double),
        ("device", Device),
    ]


class ForwardOptions(ctypes.Structure):
    """CbceForwardOptions."""

    _fields_ = [
        ("reduction", c_int32),
        ("update_prevalences", c_int32),
        ("ignore_index", c_int64),
        ("label_smoothing", c_double),
        ("grad_scale", c_double),
    ]


class Loss(ctypes.Structure):
    """The opaque CbceLoss; only pointers to it exist."""


LossPointer = POINTER(Loss)
# CbceStatus is a C enum: an int.
Status = c_int32

PROTOTYPES = {
    "cbce_version": (c_char_p, []),
    "cbce_status_string": (c_char_p, [c_int32]),
    "cbce_last_error_message": (c_char_p, []),
    "cbce_cuda_available": (c_int32, []),
    "cbce_config_default": (Config, []),
    "cbce_forward_options_default": (ForwardOptions, []),
    "cbce_new": (Status, [POINTER(Config), POINTER(LossPointer)]),
    "cbce_free": (None, [LossPointer]),
    "cbce_get_config": (Status, [LossPointer, POINTER(Config)]),
    "cbce_update": (Status, [LossPointer, POINTER(Tensor), c_int64]),
    "cbce_class_counts": (
        Status,
        [LossPointer, POINTER(Tensor), c_int64, POINTER(c_int64), c_size_t],
    ),
    "cbce_update_from_counts": (Status, [LossPointer, POINTER(c_int64), c_size_t]),
    "cbce_class_counts_tensor": (
        Status,
        [LossPointer, POINTER(Tensor), c_int64, POINTER(Tensor)],
    ),
    "cbce_update_from_counts_tensor": (Status, [LossPointer, POINTER(Tensor)]),
    "cbce_prevalences": (Status, [LossPointer, POINTER(c_float), c_size_t]),
    "cbce_weights": (Status, [LossPointer, POINTER(c_float), c_size_t]),
    "cbce_forward": (
        Status,
        [
            LossPointer,
            POINTER(Tensor),
            POINTER(Tensor),
            POINTER(ForwardOptions),
            POINTER(Tensor),
            POINTER(Tensor),
            POINTER(c_float),
            c_size_t,
            POINTER(c_double),
        ],
    ),
    "cbce_backward": (
        Status,
        [
            LossPointer,
            POINTER(Tensor),
            POINTER(Tensor),
            POINTER(ForwardOptions),
            POINTER(Tensor),
            POINTER(c_float),
            c_size_t,
            POINTER(Tensor),
        ],
    ),
    "cbce_state_size": (Status, [LossPointer, POINTER(c_size_t)]),
    "cbce_get_state": (Status, [LossPointer, POINTER(c_uint8), c_size_t, POINTER(c_size_t)]),
    "cbce_set_state": (Status, [LossPointer, POINTER(c_uint8), c_size_t]),
    "cbce_reset": (Status, [LossPointer]),
    "cbce_set_stream": (Status, [LossPointer, c_void_p]),
    "cbce_synchronize": (Status, [LossPointer]),
}

_REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
_REPOSITORY_BUILD = _REPOSITORY / "target" / "release" / "libcbce.so"


def library_path():
    """The path of the libcbce that this package loads (see the module's doc)."""
    configured = os.environ.get("CBCE_LIBRARY")
    if configured:
        if not os.path.isfile(configured):
            raise OSError(f"CBCE_LIBRARY is {configured!r}, which is not a file")
        return configured
    if _REPOSITORY_BUILD.is_file():
        return str(_REPOSITORY_BUILD)
    found = ctypes.util.find_library("cbce")
    if found:
        return found
    raise OSError(
        "libcbce not found: set CBCE_LIBRARY to the path of libcbce.so, build it with "
        "`cargo build --release`, or install it (scripts/install.sh --prefix DIR)"
    )


def load(path):
    """Loads the libcbce at `path` and declares the prototype of each of its functions."""
    library = ctypes.CDLL(path)
    for name, (restype, argtypes) in PROTOTYPES.items():
        function = getattr(library, name)
        function.restype = restype
        function.argtypes = argtypes
    return library
