//! The C-visible value types: configuration, options, and the tensor descriptor laid out
//! exactly like DLPack's `DLTensor`, with the integer constants that C code fills them with.
//!
//! Every field a C caller sets that stands for a choice (reduction, device type, dtype code, a
//! flag) is a plain integer here and is checked before it is used.

use std::ffi::c_void;

/// Reduction code: the weighted mean, sum(loss) / sum(weight of each target class).
pub const CBCE_REDUCTION_MEAN: i32 = 0;
/// Reduction code: the sum of the per-position losses.
pub const CBCE_REDUCTION_SUM: i32 = 1;
/// Reduction code: one loss per position, in the target's shape.
pub const CBCE_REDUCTION_NONE: i32 = 2;

/// DLPack device type of host memory (`kDLCPU`).
pub const CBCE_DEVICE_CPU: i32 = 1;
/// DLPack device type of CUDA device memory (`kDLCUDA`).
pub const CBCE_DEVICE_CUDA: i32 = 2;
/// DLPack device type of pinned host memory (`kDLCUDAHost`); the CPU path reads it.
pub const CBCE_DEVICE_CUDA_HOST: i32 = 3;
/// DLPack device type of CUDA managed memory (`kDLCUDAManaged`); the CPU path reads it.
pub const CBCE_DEVICE_CUDA_MANAGED: i32 = 13;

/// DLPack type code of signed integers (`kDLInt`): int64 and int32 targets.
pub const CBCE_DTYPE_INT: u8 = 0;
/// DLPack type code of unsigned integers (`kDLUInt`): uint8 targets.
pub const CBCE_DTYPE_UINT: u8 = 1;
/// DLPack type code of IEEE floats (`kDLFloat`): float16, float32, float64 logits.
pub const CBCE_DTYPE_FLOAT: u8 = 2;
/// DLPack type code of bfloat16 (`kDLBfloat`).
pub const CBCE_DTYPE_BFLOAT: u8 = 4;

/// The default ignore index, PyTorch's.
pub const CBCE_DEFAULT_IGNORE_INDEX: i64 = -100;

/// Where a tensor lives or a loss computes; the same layout as DLPack's `DLDevice`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CbceDevice {
    /// One of the `CBCE_DEVICE_*` values.
    pub device_type: i32,
    /// The device ordinal (0 for the CPU).
    pub device_id: i32,
}

/// An element type; the same layout as DLPack's `DLDataType`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CbceDataType {
    /// One of the `CBCE_DTYPE_*` codes.
    pub code: u8,
    /// Bits per lane: 16, 32 or 64 for logits; 64, 32 (int) or 8 (uint) for targets.
    pub bits: u8,
    /// Must be 1.
    pub lanes: u16,
}

/// A tensor descriptor with exactly the layout of DLPack's `DLTensor`, so that the
/// `dl_tensor` of a `DLManagedTensor` from PyTorch, NumPy, CuPy or JAX can be passed as is.
///
/// The library only borrows what a descriptor points to, for the duration of one call. `shape`
/// and `strides` count elements, not bytes; `strides` NULL means contiguous row-major. `data`
/// may be NULL only when the tensor has no elements.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CbceTensor {
    /// Base address; the first element is at `data + byte_offset`.
    pub data: *mut c_void,
    pub device: CbceDevice,
    /// Number of axes, 0 to 32.
    pub ndim: i32,
    pub dtype: CbceDataType,
    /// `ndim` extents; may be NULL when `ndim` is 0.
    pub shape: *mut i64,
    /// `ndim` strides in elements, or NULL for contiguous row-major.
    pub strides: *mut i64,
    /// Bytes from `data` to the first element; must keep elements aligned.
    pub byte_offset: u64,
}

/// How a loss is made; get the defaults from `cbce_config_default`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CbceConfig {
    /// Number of classes C, from 1 to 2^24. The default, 0, must be replaced.
    pub num_classes: u64,
    /// Decay of the moving average of prevalences, in [0, 1]. Default 0.99.
    pub ema_decay: f64,
    /// Floor for each seen class's prevalence before inversion, in [0, 1). Default 0, which
    /// is the reference's behaviour.
    pub min_prevalence: f64,
    /// Where the loss computes. Default `{CBCE_DEVICE_CPU, 0}`.
    pub device: CbceDevice,
}

/// Options of `cbce_forward` and `cbce_backward`; get the defaults from
/// `cbce_forward_options_default`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CbceForwardOptions {
    /// One of the `CBCE_REDUCTION_*` codes. Default `CBCE_REDUCTION_MEAN`.
    pub reduction: i32,
    /// 1 to update the prevalences from the target before computing the loss, 0 not to.
    /// Default 1. Not used by `cbce_backward`.
    pub update_prevalences: i32,
    /// Positions whose label equals this are skipped. Default -100.
    pub ignore_index: i64,
    /// Label smoothing in [0, 1]. Default 0.
    pub label_smoothing: f64,
    /// Upstream gradient of the reduced loss for the gradient `cbce_forward` writes (for
    /// reduction "none", of every position's loss); must be finite. Default 1. Not used by
    /// `cbce_backward`, which takes the upstream gradient as a tensor.
    pub grad_scale: f64,
}
