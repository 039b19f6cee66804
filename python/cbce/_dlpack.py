"""Borrowing tensors through DLPack without copying them.

A tensor's `__dlpack__()` gives a PyCapsule holding a DLManagedTensor, or, from producers that
speak DLPack 1.x, a DLManagedTensorVersioned. Either holds a DLTensor, whose layout CbceTensor
shares, so the library reads and writes the producer's memory directly. The capsule is not
consumed: it stays alive, unchanged, for as long as the borrowed descriptor is used, and its own
destructor then releases the producer's reference.
"""

import ctypes
from ctypes import c_int, c_uint32, c_uint64, c_void_p, c_char_p, py_object

from ._ffi import DEVICE_CUDA, DEVICE_CUDA_MANAGED, Tensor

_UNVERSIONED = b"dltensor"
_VERSIONED = b"dltensor_versioned"
_READ_ONLY_FLAG = 1 << 0
_SUPPORTED_MAJOR_VERSION = 1


class _ManagedTensor(ctypes.Structure):
    """DLManagedTensor."""

    _fields_ = [("dl_tensor", Tensor), ("manager_ctx", c_void_p), ("deleter", c_void_p)]


class _PackVersion(ctypes.Structure):
    """DLPackVersion."""

    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class _ManagedTensorVersioned(ctypes.Structure):
    """DLManagedTensorVersioned."""

    _fields_ = [
        ("version", _PackVersion),
        ("manager_ctx", c_void_p),
        ("deleter", c_void_p),
        ("flags", c_uint64),
        ("dl_tensor", Tensor),
    ]


# Prototypes of their own, so that other users of ctypes.pythonapi keep theirs.
_capsule_is_valid = ctypes.PYFUNCTYPE(c_int, py_object, c_char_p)(
    ("PyCapsule_IsValid", ctypes.pythonapi)
)
_capsule_pointer = ctypes.PYFUNCTYPE(c_void_p, py_object, c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


class Borrowed:
    """A CbceTensor describing another library's tensor, valid while this object lives."""

    __slots__ = ("capsule", "tensor")

    def __init__(self, capsule, tensor):
        self.capsule = capsule
        self.tensor = tensor

    @property
    def pointer(self):
        """The argument for a `const CbceTensor *` parameter."""
        return ctypes.pointer(self.tensor)

    @property
    def shape(self):
        return tuple(self.tensor.shape[axis] for axis in range(self.tensor.ndim))

    @property
    def dtype(self):
        return (self.tensor.dtype.code, self.tensor.dtype.bits, self.tensor.dtype.lanes)


def borrow(tensor, name, writable=False, stream=None):
    """The DLTensor of `tensor` (anything with `__dlpack__`) as a CbceTensor, without a copy.

    `writable` refuses tensors that their producer marks read-only. `stream` is the DLPack
    stream value of the CUDA stream the library will use (1: the legacy default stream); the
    producer of a CUDA tensor orders its own work before it. Raises TypeError for an object
    that does not speak DLPack.
    """
    if not hasattr(tensor, "__dlpack__"):
        raise TypeError(
            f"`{name}` is a {type(tensor).__name__}, which has no __dlpack__; pass a NumPy "
            "array or a tensor of a DLPack-capable library"
        )
    arguments = {}
    if stream is not None and hasattr(tensor, "__dlpack_device__"):
        if tensor.__dlpack_device__()[0] in (DEVICE_CUDA, DEVICE_CUDA_MANAGED):
            arguments["stream"] = stream
    try:
        capsule = tensor.__dlpack__(max_version=(_SUPPORTED_MAJOR_VERSION, 0), **arguments)
    except TypeError:
        # A producer older than DLPack 1.0, whose __dlpack__ takes no max_version.
        capsule = tensor.__dlpack__(**arguments)

    if _capsule_is_valid(capsule, _VERSIONED):
        managed = _ManagedTensorVersioned.from_address(_capsule_pointer(capsule, _VERSIONED))
        if managed.version.major != _SUPPORTED_MAJOR_VERSION:
            raise TypeError(
                f"`{name}` comes in DLPack {managed.version.major}.{managed.version.minor}, "
                f"but only {_SUPPORTED_MAJOR_VERSION}.x is understood"
            )
        if writable and managed.flags & _READ_ONLY_FLAG:
            raise ValueError(f"`{name}` is an output but its producer marks it read-only")
    elif _capsule_is_valid(capsule, _UNVERSIONED):
        managed = _ManagedTensor.from_address(_capsule_pointer(capsule, _UNVERSIONED))
    else:
        raise TypeError(f"`{name}`.__dlpack__() did not return an unused DLPack capsule")
    return Borrowed(capsule, managed.dl_tensor)
