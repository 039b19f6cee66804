//! The exported functions. Each one runs inside the panic boundary, takes its arguments apart
//! through `ptr`, calls the Rust API, and writes its outputs only when that succeeded.

use super::boundary;
use super::ptr::{self, Tensor};
use super::types::*;
use crate::config::{Config, Device};
use crate::dtype::{DType, Label, Logit};
use crate::error::{Error, Result, Status};
use crate::loss::{backward_into, ClassBalancedLoss, ForwardOptions, ForwardSummary, Reduction};
use half::{bf16, f16};
use std::ffi::c_char;

/// An opaque loss object: configuration and running class prevalences, on the CPU or on a
/// CUDA device.
///
/// Made by `cbce_new`, released by `cbce_free`. Safe to share between threads.
pub struct CbceLoss {
    backend: Backend,
}

/// Where a handle computes and keeps its state.
enum Backend {
    Cpu(ClassBalancedLoss),
    /// Boxed: it holds the table of loaded kernels.
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::CudaLoss>),
}

impl Backend {
    fn new(config: Config) -> Result<Backend> {
        match config.device {
            Device::Cpu => Ok(Backend::Cpu(ClassBalancedLoss::new(config)?)),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(Backend::Cuda(Box::new(crate::cuda::CudaLoss::new(config)?))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                Err(Error::Unsupported("this build of cbce has no cuda support".into()))
            }
        }
    }

    fn config(&self) -> Config {
        match self {
            Backend::Cpu(loss) => loss.config(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.config(),
        }
    }

    fn num_classes(&self) -> usize {
        self.config().num_classes
    }
}

/// The version of the library, for example "0.1.0": a static string, never freed.
#[no_mangle]
pub extern "C" fn cbce_version() -> *const c_char {
    boundary::value(std::ptr::null(), || VERSION.as_ptr().cast())
}

const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// A static description of a status code; "unknown status" for values that are not one.
#[no_mangle]
pub extern "C" fn cbce_status_string(status: i32) -> *const c_char {
    boundary::value(std::ptr::null(), || {
        let text: &'static str = match Status::from_code(status) {
            Some(status) => STATUS_TEXT[status as usize],
            None => "unknown status\0",
        };
        text.as_ptr().cast()
    })
}

const STATUS_TEXT: [&str; 14] = [
    "ok\0",
    "a required pointer is NULL\0",
    "invalid configuration\0",
    "invalid argument\0",
    "unsupported dtype\0",
    "shape mismatch\0",
    "invalid tensor layout\0",
    "label out of range\0",
    "buffer length mismatch\0",
    "invalid state\0",
    "device mismatch\0",
    "unsupported in this build or on this machine\0",
    "cuda error\0",
    "internal error (caught panic)\0",
];

/// The message of this thread's most recent call into the library if it failed, naming the
/// data that was wrong; the empty string if that call succeeded. The string belongs to the
/// library and stays valid until this thread's next call into it.
#[no_mangle]
pub extern "C" fn cbce_last_error_message() -> *const c_char {
    boundary::value(std::ptr::null(), boundary::last_error)
}

/// 1 if this build has the CUDA path and a CUDA device is usable (the driver, libcuda.so.1,
/// loads and reports at least one device), 0 otherwise. Any thread may call it.
#[no_mangle]
pub extern "C" fn cbce_cuda_available() -> i32 {
    boundary::value(0, || {
        #[cfg(feature = "cuda")]
        return i32::from(crate::cuda::available());
        #[cfg(not(feature = "cuda"))]
        0
    })
}

/// The default configuration: num_classes 0 (set it), ema_decay 0.99, min_prevalence 0, on
/// the CPU.
#[no_mangle]
pub extern "C" fn cbce_config_default() -> CbceConfig {
    boundary::value(DEFAULT_CONFIG, || DEFAULT_CONFIG)
}

const DEFAULT_CONFIG: CbceConfig = CbceConfig {
    num_classes: 0,
    ema_decay: 0.99,
    min_prevalence: 0.0,
    device: CbceDevice { device_type: CBCE_DEVICE_CPU, device_id: 0 },
};

/// The default forward options: mean reduction, update on, ignore index -100, no label
/// smoothing, grad_scale 1.
#[no_mangle]
pub extern "C" fn cbce_forward_options_default() -> CbceForwardOptions {
    boundary::value(DEFAULT_OPTIONS, || DEFAULT_OPTIONS)
}

const DEFAULT_OPTIONS: CbceForwardOptions = CbceForwardOptions {
    reduction: CBCE_REDUCTION_MEAN,
    update_prevalences: 1,
    ignore_index: CBCE_DEFAULT_IGNORE_INDEX,
    label_smoothing: 0.0,
    grad_scale: 1.0,
};

/// Makes a loss from `config` and stores it in `*out`; every class starts unseen.
///
/// `config` and `out` must not be NULL. `*out` is written only on success, and the caller then
/// owns the handle and releases it with `cbce_free`.
///
/// With `config->device` `{CBCE_DEVICE_CUDA, ordinal}` the handle computes on that CUDA device,
/// in its primary context (the one PyTorch uses), keeps its state in device memory and
/// enqueues its work on the stream given by `cbce_set_stream` (the legacy default stream until
/// then); see `cbce_set_stream` for what waits for the device.
///
/// Statuses: NULL_POINTER; INVALID_CONFIG (num_classes not in [1, 2^24], ema_decay not in
/// [0, 1], min_prevalence not in [0, 1), unknown device type, a CUDA ordinal the machine does
/// not have); UNSUPPORTED (a CUDA device in a build without CUDA, or no usable driver);
/// CUDA_ERROR (the driver failed, for example out of device memory).
///
/// # Safety
/// Non-NULL pointers must point to valid objects of their types.
#[no_mangle]
pub unsafe extern "C" fn cbce_new(config: *const CbceConfig, out: *mut *mut CbceLoss) -> Status {
    boundary::status(|| {
        let config = ptr::reference(config, "config")?;
        let out = ptr::mutable(out, "out")?;

        let config = config_from_c(config)?;
        let backend = Backend::new(config)?;

        *out = ptr::into_raw(CbceLoss { backend });
        Ok(())
    })
}

/// Releases a loss made by `cbce_new`. NULL does nothing. The handle must not be used again,
/// and no other thread may be using it. A CUDA handle first waits for the work it enqueued.
///
/// # Safety
/// `loss` is NULL or a handle from `cbce_new` that was not freed yet.
#[no_mangle]
pub unsafe extern "C" fn cbce_free(loss: *mut CbceLoss) {
    boundary::value((), || ptr::drop_raw(loss))
}

/// Writes the configuration the loss was made with into `*out`.
///
/// Statuses: NULL_POINTER.
///
/// # Safety
/// Non-NULL pointers must point to valid objects of their types.
#[no_mangle]
pub unsafe extern "C" fn cbce_get_config(loss: *const CbceLoss, out: *mut CbceConfig) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        let out = ptr::mutable(out, "out")?;

        let config = loss.backend.config();

        *out = config_to_c(&config);
        Ok(())
    })
}

/// Updates the running prevalences from the labels of `target` (any shape; int64, int32 or
/// uint8). Labels outside [0, C) and `ignore_index` are dropped.
///
/// Statuses: NULL_POINTER; UNSUPPORTED_DTYPE; INVALID_LAYOUT; DEVICE_MISMATCH.
///
/// # Safety
/// Non-NULL pointers must point to valid objects; `target` must describe live memory.
#[no_mangle]
pub unsafe extern "C" fn cbce_update(
    loss: *const CbceLoss,
    target: *const CbceTensor,
    ignore_index: i64,
) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        let target = Tensor::new(target, "target")?;

        match &loss.backend {
            Backend::Cpu(loss) => loss.update_from_counts(&counts_of(loss, &target, ignore_index)?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.update(&target, ignore_index),
        }
    })
}

/// Counts the labels of `target` per class into `counts` (length `len`, which must be C),
/// dropping labels outside [0, C) and `ignore_index`, without changing the state. With
/// `cbce_update_from_counts` this lets data-parallel ranks add their counts (an all-reduce)
/// and all apply the same update.
///
/// Statuses: NULL_POINTER; BUFFER_LENGTH; UNSUPPORTED_DTYPE; INVALID_LAYOUT; DEVICE_MISMATCH.
///
/// # Safety
/// Non-NULL pointers must point to valid objects; `counts` to `len` writable int64 values.
#[no_mangle]
pub unsafe extern "C" fn cbce_class_counts(
    loss: *const CbceLoss,
    target: *const CbceTensor,
    ignore_index: i64,
    counts: *mut i64,
    len: usize,
) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        let target = Tensor::new(target, "target")?;
        check_len("counts", len, loss.backend.num_classes())?;
        let out = ptr::slice_mut(counts, len, "counts")?;

        let tally = match &loss.backend {
            Backend::Cpu(loss) => counts_of(loss, &target, ignore_index)?,
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.class_counts(&target, ignore_index)?,
        };

        for (slot, &count) in out.iter_mut().zip(&tally) {
            *slot = count as i64;
        }
        Ok(())
    })
}

/// Updates the running prevalences from per-class counts (length `len`, which must be C), for
/// example counts summed over ranks. Gives exactly the state `cbce_update` over all of the
/// counted labels gives.
///
/// Statuses: NULL_POINTER; BUFFER_LENGTH; INVALID_STATE (a negative count, or a total that
/// overflows).
///
/// # Safety
/// Non-NULL pointers must point to valid objects; `counts` to `len` int64 values.
#[no_mangle]
pub unsafe extern "C" fn cbce_update_from_counts(
    loss: *const CbceLoss,
    counts: *const i64,
    len: usize,
) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        check_len("counts", len, loss.backend.num_classes())?;
        let counts = ptr::slice(counts, len, "counts")?;

        let counts = unsigned_counts(counts.iter().copied())?;

        match &loss.backend {
            Backend::Cpu(loss) => loss.update_from_counts(&counts),
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.update_from_counts(&counts),
        }
    })
}

/// `cbce_class_counts` into a tensor: counts the labels of `target` per class into `counts`,
/// an int64 tensor of shape (C) with any strides whose elements do not overlap, dropping
/// labels outside [0, C) and `ignore_index`, without changing the state. The library only
/// borrows both tensors for the call; the caller owns them.
///
/// On a CPU handle `counts` is host memory and is written before the call returns. On a CUDA
/// handle `target` and `counts` are memory of the handle's device (or managed memory): the
/// call only enqueues the counting and the write on the handle's stream and returns without
/// waiting, so the counts can stay on the device for the next work on that stream, for example
/// an NCCL all-reduce followed by `cbce_update_from_counts_tensor`. Read them only after that
/// stream has reached this point.
///
/// Any thread may call it; `counts` must not be written by anything else until the call (on
/// CUDA, its enqueued work) is done. `counts` is written only on success.
///
/// Statuses: NULL_POINTER; UNSUPPORTED_DTYPE (a target that is not int64, int32 or uint8, or
/// counts that are not int64); SHAPE_MISMATCH (counts not of shape (C)); INVALID_LAYOUT (bad
/// strides, counts overlapping themselves or the target); DEVICE_MISMATCH.
///
/// # Safety
/// Non-NULL pointers must point to valid objects; `target` must describe live memory, and
/// `counts` live memory that nothing else accesses during the call.
#[no_mangle]
pub unsafe extern "C" fn cbce_class_counts_tensor(
    loss: *const CbceLoss,
    target: *const CbceTensor,
    ignore_index: i64,
    counts: *const CbceTensor,
) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        let target = Tensor::new(target, "target")?;
        let counts = Tensor::new(counts, "counts")?;
        check_counts_tensor(&counts, loss.backend.num_classes())?;
        counts.check_no_self_overlap()?;
        ptr::check_disjoint(&counts, &target, 8)?;

        match &loss.backend {
            Backend::Cpu(loss) => {
                check_host(&counts)?;
                let tally = counts_of(loss, &target, ignore_index)?;
                let mut out = counts.view_mut::<i64>()?;
                for (slot, &count) in out.iter_mut().zip(&tally) {
                    *slot = count as i64;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.class_counts_into(&target, ignore_index, &counts),
        }
    })
}

/// `cbce_update_from_counts` from a tensor: updates the running prevalences from `counts`, an
/// int64 tensor of shape (C) with any strides, for example counts that an all-reduce summed
/// over ranks. Gives exactly the state `cbce_update_from_counts` gives with the same values.
/// The library only borrows `counts` for the call; the caller owns it.
///
/// On a CPU handle `counts` is host memory; a negative count or a total that overflows 64 bits
/// fails with INVALID_STATE and changes nothing.
///
/// On a CUDA handle `counts` is memory of the handle's device (or managed memory), read in
/// stream order: the call only enqueues the update on the handle's stream and returns without
/// waiting, so `counts` may be written by earlier work on that stream (an NCCL all-reduce) and
/// must stay unchanged until the handle's work reaches this point. Negative counts or an
/// overflowing total are found on the device: the update leaves the state unchanged, and the
/// next waiting call (see `cbce_set_stream`) returns INVALID_STATE with the class and count
/// instead of its own results (once; the call after it succeeds).
///
/// Any thread may call it.
///
/// Statuses: NULL_POINTER; UNSUPPORTED_DTYPE (counts that are not int64); SHAPE_MISMATCH
/// (counts not of shape (C)); INVALID_LAYOUT; DEVICE_MISMATCH; INVALID_STATE (a negative count,
/// or a total that overflows).
///
/// # Safety
/// Non-NULL pointers must point to valid objects; `counts` must describe live memory.
#[no_mangle]
pub unsafe extern "C" fn cbce_update_from_counts_tensor(
    loss: *const CbceLoss,
    counts: *const CbceTensor,
) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        let counts = Tensor::new(counts, "counts")?;
        check_counts_tensor(&counts, loss.backend.num_classes())?;

        match &loss.backend {
            Backend::Cpu(loss) => {
                check_host(&counts)?;
                let values = unsigned_counts(counts.view::<i64>()?.iter().copied())?;
                loss.update_from_counts(&values)
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.update_from_counts_tensor(&counts),
        }
    })
}

/// Writes the prevalences (float32, NaN for classes never seen) into `out`, of length `len`,
/// which must be C.
///
/// Statuses: NULL_POINTER; BUFFER_LENGTH.
///
/// # Safety
/// Non-NULL pointers must point to valid objects; `out` to `len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn cbce_prevalences(
    loss: *const CbceLoss,
    out: *mut f32,
    len: usize,
) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        check_len("out", len, loss.backend.num_classes())?;
        let out = ptr::slice_mut(out, len, "out")?;

        let prevalences = match &loss.backend {
            Backend::Cpu(loss) => loss.prevalences(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.prevalences()?,
        };
        out.copy_from_slice(&prevalences);
        Ok(())
    })
}

/// Writes the class weights that a forward call without update would use into `out`, of
/// length `len`, which must be C.
///
/// Statuses: NULL_POINTER; BUFFER_LENGTH.
///
/// # Safety
/// Non-NULL pointers must point to valid objects; `out` to `len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn cbce_weights(loss: *const CbceLoss, out: *mut f32, len: usize) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        check_len("out", len, loss.backend.num_classes())?;
        let out = ptr::slice_mut(out, len, "out")?;

        let weights = match &loss.backend {
            Backend::Cpu(loss) => loss.weights(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.weights()?,
        };
        out.copy_from_slice(&weights);
        Ok(())
    })
}

/// Computes the class-balanced cross-entropy of `logits` against `target`, updating the
/// prevalences first when `options->update_prevalences` is 1.
///
/// - `logits`: (C), (N, C) or (N, C, d1, ..., dk); float16, bfloat16, float32 or float64;
///   any strides.
/// - `target`: (), (N) or (N, d1, ..., dk); int64, int32 or uint8.
/// - `options`: NULL means `cbce_forward_options_default()`.
/// - `loss`: output in the logits' dtype; one element for "mean" and "sum", the target's shape
///   for "none".
/// - `grad`: optional output of the logits' shape and dtype: the gradient of
///   `grad_scale * loss` (for "none", of `grad_scale * sum(loss)`).
/// - `weights_used`: optional output of `weights_used_len` (= C) floats: the weights used.
/// - `weight_sum`: optional output: the sum of the weights of the labels that are not ignored,
///   the denominator of "mean".
///
/// Every label is checked before anything changes: a label outside [0, C) that is not the
/// ignore index fails with LABEL_OUT_OF_RANGE and leaves the state as it was. Outputs must not
/// overlap inputs.
///
/// On a CUDA handle the tensors are memory of the handle's device (or managed memory), and
/// the call only enqueues its work on the handle's stream, unless `weights_used` or
/// `weight_sum` (host memory) is given: then it waits for the device to write them, and
/// reports its own bad label. Otherwise a bad label is reported by the next call that waits
/// (see `cbce_set_stream`).
///
/// Statuses: NULL_POINTER; INVALID_ARGUMENT (reduction code, update flag, label smoothing,
/// grad_scale); UNSUPPORTED_DTYPE; SHAPE_MISMATCH; INVALID_LAYOUT; LABEL_OUT_OF_RANGE;
/// BUFFER_LENGTH; DEVICE_MISMATCH.
///
/// # Safety
/// Non-NULL pointers must point to valid objects; tensors must describe live memory, and
/// output tensors memory that nothing else accesses during the call.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cbce_forward(
    loss: *const CbceLoss,
    logits: *const CbceTensor,
    target: *const CbceTensor,
    options: *const CbceForwardOptions,
    loss_out: *const CbceTensor,
    grad: *const CbceTensor,
    weights_used: *mut f32,
    weights_used_len: usize,
    weight_sum: *mut f64,
) -> Status {
    boundary::status(|| {
        let handle = ptr::reference(loss, "loss")?;
        let logits = Tensor::new(logits, "logits")?;
        let target = Tensor::new(target, "target")?;
        let options = options_from_c(options)?;
        let loss_out = Tensor::new(loss_out, "loss_out")?;
        let grad = optional_tensor(grad, "grad")?;
        let weights_out = if weights_used.is_null() {
            None
        } else {
            check_len("weights_used", weights_used_len, handle.backend.num_classes())?;
            Some(ptr::slice_mut(weights_used, weights_used_len, "weights_used")?)
        };
        let weight_sum = (!weight_sum.is_null()).then(|| ptr::mutable(weight_sum, "weight_sum"));
        let weight_sum = weight_sum.transpose()?;

        let (weights_used, sum) = match &handle.backend {
            Backend::Cpu(loss) => {
                let summary =
                    forward_dispatch(loss, &logits, &target, &options, &loss_out, grad.as_ref())?;
                (summary.weights_used, summary.weight_sum)
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => {
                let host = weights_out.is_some() || weight_sum.is_some();
                let summary =
                    loss.forward(&logits, &target, &options, &loss_out, grad.as_ref(), host)?;
                summary.map_or((Vec::new(), f64::NAN), |s| (s.weights_used, s.weight_sum))
            }
        };

        if let Some(out) = weights_out {
            out.copy_from_slice(&weights_used);
        }
        if let Some(out) = weight_sum {
            *out = sum;
        }
        Ok(())
    })
}

/// Computes the gradient with respect to `logits` from the upstream gradient `grad_loss` (the
/// logits' dtype; one element for "mean" and "sum", the target's shape for "none") and the
/// `weights` (`weights_len` = C floats) that the forward call used, into `grad` (the logits'
/// shape and dtype). `options` gives reduction, ignore index and label smoothing; NULL means
/// the defaults. The state is not read or changed.
///
/// On a CUDA handle the tensors are device memory as for `cbce_forward`, `weights` is host
/// memory (copied in stream order, so it may be reused at once), and the call only enqueues.
///
/// Statuses: as `cbce_forward`, and INVALID_ARGUMENT for a weight that is not finite.
///
/// # Safety
/// As `cbce_forward`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cbce_backward(
    loss: *const CbceLoss,
    logits: *const CbceTensor,
    target: *const CbceTensor,
    options: *const CbceForwardOptions,
    grad_loss: *const CbceTensor,
    weights: *const f32,
    weights_len: usize,
    grad: *const CbceTensor,
) -> Status {
    boundary::status(|| {
        let handle = ptr::reference(loss, "loss")?;
        let logits = Tensor::new(logits, "logits")?;
        let target = Tensor::new(target, "target")?;
        let options = options_from_c(options)?;
        let grad_loss = Tensor::new(grad_loss, "grad_loss")?;
        check_len("weights", weights_len, handle.backend.num_classes())?;
        let weights = ptr::slice(weights, weights_len, "weights")?;
        let grad = Tensor::new(grad, "grad")?;

        match &handle.backend {
            Backend::Cpu(_) => {
                backward_dispatch(&logits, &target, &options, &grad_loss, weights, &grad)
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => {
                loss.backward(&logits, &target, &options, &grad_loss, weights, &grad)
            }
        }
    })
}

/// Writes into `*out` the size in bytes of the state blob that `cbce_get_state` writes.
///
/// Statuses: NULL_POINTER.
///
/// # Safety
/// Non-NULL pointers must point to valid objects of their types.
#[no_mangle]
pub unsafe extern "C" fn cbce_state_size(loss: *const CbceLoss, out: *mut usize) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        let out = ptr::mutable(out, "out")?;

        *out = crate::prevalence::Prevalences::encoded_len(loss.backend.num_classes());
        Ok(())
    })
}

/// Writes the full running state (double precision, unseen classes marked, with a checksum)
/// into `buffer` of `len` bytes, at least `cbce_state_size`; `*written` (optional) gets the
/// number of bytes written. For checkpoints: `cbce_set_state` restores it exactly.
///
/// Statuses: NULL_POINTER; BUFFER_LENGTH (buffer too small).
///
/// # Safety
/// Non-NULL pointers must point to valid objects; `buffer` to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cbce_get_state(
    loss: *const CbceLoss,
    buffer: *mut u8,
    len: usize,
    written: *mut usize,
) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        let bytes = match &loss.backend {
            Backend::Cpu(loss) => loss.state_bytes(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.running_state()?.to_bytes(),
        };
        if len < bytes.len() {
            return Err(Error::BufferLength { name: "buffer", expected: bytes.len(), actual: len });
        }
        let out = ptr::slice_mut(buffer, bytes.len(), "buffer")?;
        let written = (!written.is_null()).then(|| ptr::mutable(written, "written")).transpose()?;

        out.copy_from_slice(&bytes);
        if let Some(written) = written {
            *written = bytes.len();
        }
        Ok(())
    })
}

/// Replaces the running state with one written by `cbce_get_state` (`len` bytes at `buffer`).
/// A blob that is truncated, damaged, of another format version or for another number of
/// classes fails with INVALID_STATE and changes nothing.
///
/// Statuses: NULL_POINTER; INVALID_STATE.
///
/// # Safety
/// Non-NULL pointers must point to valid objects; `buffer` to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cbce_set_state(
    loss: *const CbceLoss,
    buffer: *const u8,
    len: usize,
) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;
        if buffer.is_null() {
            return Err(Error::NullPointer("buffer"));
        }
        let bytes = ptr::slice(buffer, len, "buffer")?;

        match &loss.backend {
            Backend::Cpu(loss) => loss.restore_state_bytes(bytes),
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.set_running_state(
                &crate::prevalence::Prevalences::from_bytes(bytes, loss.num_classes())?,
            ),
        }
    })
}

/// Forgets every update: all classes unseen, as after `cbce_new`.
///
/// Statuses: NULL_POINTER.
///
/// # Safety
/// Non-NULL pointers must point to valid objects of their types.
#[no_mangle]
pub unsafe extern "C" fn cbce_reset(loss: *const CbceLoss) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;

        match &loss.backend {
            Backend::Cpu(loss) => {
                loss.reset();
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.reset(),
        }
    })
}

/// Sets the CUDA stream on which a CUDA handle enqueues its work from now on: a `CUstream` or
/// `cudaStream_t` (PyTorch: `torch.cuda.current_stream().cuda_stream`), or NULL for the legacy
/// default stream. Work already enqueued on the previous stream is ordered before the new
/// stream's, without waiting on the host. The stream must stay valid while it is the handle's;
/// set another (or NULL) before destroying it.
///
/// On a CUDA handle, every call only enqueues work and returns, except those that hand results
/// to the host, which wait for the handle's work: `cbce_prevalences`, `cbce_weights`,
/// `cbce_get_state`, `cbce_class_counts`, `cbce_synchronize`, and `cbce_forward` when
/// `weights_used` or `weight_sum` is given. A label outside [0, C) is found on the device: the
/// call that had it leaves the state unchanged and writes NaN into its loss and gradient, and
/// the next waiting call returns LABEL_OUT_OF_RANGE with that label and position instead of
/// its own results (once; the call after it succeeds). In the same way, negative counts or an
/// overflowing total given to `cbce_update_from_counts_tensor` leave the state unchanged and
/// make the next waiting call return INVALID_STATE. `cbce_class_counts_tensor` and
/// `cbce_update_from_counts_tensor` do not wait.
///
/// Statuses: NULL_POINTER (`loss`); UNSUPPORTED (a CPU handle); CUDA_ERROR.
///
/// # Safety
/// `loss` must be a valid handle, and `stream` NULL or a live stream of the handle's device.
#[no_mangle]
pub unsafe extern "C" fn cbce_set_stream(
    loss: *const CbceLoss,
    stream: *mut std::ffi::c_void,
) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;

        match &loss.backend {
            Backend::Cpu(_) => {
                let _ = stream;
                Err(Error::Unsupported(
                    "streams apply to cuda handles; this one is on the cpu".into(),
                ))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.set_stream(stream as usize),
        }
    })
}

/// Waits until the work a CUDA handle enqueued has finished, and reports a label outside
/// [0, C), or counts given to `cbce_update_from_counts_tensor` that were negative or
/// overflowed, found since the last wait (see `cbce_set_stream`); only the first such error is
/// kept. On a CPU handle nothing is ever pending, and it returns OK.
///
/// Statuses: NULL_POINTER; LABEL_OUT_OF_RANGE; INVALID_STATE (bad counts on the device);
/// CUDA_ERROR.
///
/// # Safety
/// `loss` must be a valid handle.
#[no_mangle]
pub unsafe extern "C" fn cbce_synchronize(loss: *const CbceLoss) -> Status {
    boundary::status(|| {
        let loss = ptr::reference(loss, "loss")?;

        match &loss.backend {
            Backend::Cpu(_) => Ok(()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(loss) => loss.synchronize(),
        }
    })
}

fn check_len(name: &'static str, actual: usize, expected: usize) -> Result<()> {
    if actual != expected {
        return Err(Error::BufferLength { name, expected, actual });
    }
    Ok(())
}

/// The counts of C classes from C, each checked not to be negative.
fn unsigned_counts(counts: impl Iterator<Item = i64>) -> Result<Vec<u64>> {
    counts
        .enumerate()
        .map(|(class, count)| {
            u64::try_from(count).map_err(|_| {
                Error::InvalidState(format!("count {count} of class {class} is negative"))
            })
        })
        .collect()
}

/// Fails unless `counts` is an int64 tensor of shape (C).
fn check_counts_tensor(counts: &Tensor<'_>, num_classes: usize) -> Result<()> {
    if counts.dtype() != DType::I64 {
        return Err(Error::UnsupportedDtype {
            tensor: counts.name,
            dtype: counts.dtype().to_string(),
            expected: "int64",
        });
    }
    if counts.shape != [num_classes] {
        return Err(Error::ShapeMismatch(format!(
            "counts have shape {:?} but the loss needs [{num_classes}]",
            counts.shape
        )));
    }
    Ok(())
}

fn optional_tensor<'a>(ptr: *const CbceTensor, name: &'static str) -> Result<Option<Tensor<'a>>> {
    if ptr.is_null() {
        return Ok(None);
    }
    Tensor::new(ptr, name).map(Some)
}

fn config_from_c(config: &CbceConfig) -> Result<Config> {
    let device = match config.device.device_type {
        CBCE_DEVICE_CPU => Device::Cpu,
        CBCE_DEVICE_CUDA => Device::Cuda(config.device.device_id),
        other => {
            return Err(Error::InvalidConfig(format!(
                "device type {other} is neither CBCE_DEVICE_CPU (1) nor CBCE_DEVICE_CUDA (2)"
            )))
        }
    };
    let num_classes = usize::try_from(config.num_classes).unwrap_or(usize::MAX);
    let config = Config {
        num_classes,
        ema_decay: config.ema_decay,
        min_prevalence: config.min_prevalence,
        device,
    };
    config.validate()?;
    Ok(config)
}

fn config_to_c(config: &Config) -> CbceConfig {
    let device = match config.device {
        Device::Cpu => CbceDevice { device_type: CBCE_DEVICE_CPU, device_id: 0 },
        Device::Cuda(ordinal) => CbceDevice { device_type: CBCE_DEVICE_CUDA, device_id: ordinal },
    };
    CbceConfig {
        num_classes: config.num_classes as u64,
        ema_decay: config.ema_decay,
        min_prevalence: config.min_prevalence,
        device,
    }
}

fn options_from_c(options: *const CbceForwardOptions) -> Result<ForwardOptions> {
    let options =
        if options.is_null() { DEFAULT_OPTIONS } else { *ptr::reference(options, "options")? };
    let reduction = match options.reduction {
        CBCE_REDUCTION_MEAN => Reduction::Mean,
        CBCE_REDUCTION_SUM => Reduction::Sum,
        CBCE_REDUCTION_NONE => Reduction::None,
        other => {
            return Err(Error::invalid_argument(
                "reduction",
                format!("{other} is not CBCE_REDUCTION_MEAN (0), _SUM (1) or _NONE (2)"),
            ))
        }
    };
    let update_prevalences = match options.update_prevalences {
        0 => false,
        1 => true,
        other => {
            return Err(Error::invalid_argument(
                "update_prevalences",
                format!("{other} is not 0 or 1"),
            ))
        }
    };
    Ok(ForwardOptions {
        reduction,
        ignore_index: options.ignore_index,
        label_smoothing: options.label_smoothing,
        update_prevalences,
        grad_scale: options.grad_scale,
    })
}

/// Fails unless `tensor` is in memory the CPU path can read.
fn check_host(tensor: &Tensor<'_>) -> Result<()> {
    match tensor.descriptor.device.device_type {
        CBCE_DEVICE_CPU | CBCE_DEVICE_CUDA_HOST | CBCE_DEVICE_CUDA_MANAGED => Ok(()),
        other => Err(Error::DeviceMismatch {
            tensor: tensor.name,
            found: format!("device type {other}"),
            expected: Device::Cpu.to_string(),
        }),
    }
}

#[derive(Clone, Copy)]
enum LogitType {
    F16,
    BF16,
    F32,
    F64,
}

#[derive(Clone, Copy)]
enum LabelType {
    I64,
    I32,
    U8,
}

fn logit_type(tensor: &Tensor<'_>) -> Result<LogitType> {
    check_host(tensor)?;
    match tensor.dtype() {
        DType::F16 => Ok(LogitType::F16),
        DType::BF16 => Ok(LogitType::BF16),
        DType::F32 => Ok(LogitType::F32),
        DType::F64 => Ok(LogitType::F64),
        other => Err(Error::UnsupportedDtype {
            tensor: tensor.name,
            dtype: other.to_string(),
            expected: "float16, bfloat16, float32 or float64",
        }),
    }
}

fn label_type(tensor: &Tensor<'_>) -> Result<LabelType> {
    check_host(tensor)?;
    match tensor.dtype() {
        DType::I64 => Ok(LabelType::I64),
        DType::I32 => Ok(LabelType::I32),
        DType::U8 => Ok(LabelType::U8),
        other => Err(Error::UnsupportedDtype {
            tensor: tensor.name,
            dtype: other.to_string(),
            expected: "int64, int32 or uint8",
        }),
    }
}

/// Fails unless `tensor` is host memory with the same dtype as the logits.
fn check_same_dtype(tensor: &Tensor<'_>, logits: &Tensor<'_>) -> Result<()> {
    check_host(tensor)?;
    tensor.check_dtype_matches(logits)
}

/// Calls `$body` with `$T` bound to the Rust type of logits type `$logits` and `$L` to that
/// of label type `$labels`.
macro_rules! with_types {
    ($logits:expr, $labels:expr, |$T:ident, $L:ident| $body:expr) => {{
        macro_rules! with_label {
            ($inner:ty) => {{
                type $T = $inner;
                match $labels {
                    LabelType::I64 => {
                        type $L = i64;
                        $body
                    }
                    LabelType::I32 => {
                        type $L = i32;
                        $body
                    }
                    LabelType::U8 => {
                        type $L = u8;
                        $body
                    }
                }
            }};
        }
        match $logits {
            LogitType::F16 => with_label!(f16),
            LogitType::BF16 => with_label!(bf16),
            LogitType::F32 => with_label!(f32),
            LogitType::F64 => with_label!(f64),
        }
    }};
}

fn counts_of(loss: &ClassBalancedLoss, target: &Tensor<'_>, ignore_index: i64) -> Result<Vec<u64>> {
    match label_type(target)? {
        LabelType::I64 => loss.class_counts(target.view::<i64>()?, ignore_index),
        LabelType::I32 => loss.class_counts(target.view::<i32>()?, ignore_index),
        LabelType::U8 => loss.class_counts(target.view::<u8>()?, ignore_index),
    }
}

fn forward_dispatch(
    loss: &ClassBalancedLoss,
    logits: &Tensor<'_>,
    target: &Tensor<'_>,
    options: &ForwardOptions,
    loss_out: &Tensor<'_>,
    grad: Option<&Tensor<'_>>,
) -> Result<ForwardSummary> {
    let logit_type = logit_type(logits)?;
    let label_type = label_type(target)?;
    check_same_dtype(loss_out, logits)?;
    if let Some(grad) = grad {
        check_same_dtype(grad, logits)?;
    }
    with_types!(logit_type, label_type, |T, L| forward_typed::<T, L>(
        loss, logits, target, options, loss_out, grad
    ))
}

fn forward_typed<T: Logit, L: Label>(
    loss: &ClassBalancedLoss,
    logits: &Tensor<'_>,
    target: &Tensor<'_>,
    options: &ForwardOptions,
    loss_out: &Tensor<'_>,
    grad: Option<&Tensor<'_>>,
) -> Result<ForwardSummary> {
    let size = std::mem::size_of::<T>();
    for output in std::iter::once(loss_out).chain(grad) {
        ptr::check_disjoint(output, logits, size)?;
        ptr::check_disjoint(output, target, size)?;
    }
    if let Some(grad) = grad {
        ptr::check_disjoint(grad, loss_out, size)?;
    }
    let grad = grad.map(|g| g.view_mut::<T>()).transpose()?;
    loss.forward_into(
        logits.view::<T>()?,
        target.view::<L>()?,
        options,
        loss_out.view_mut::<T>()?,
        grad,
    )
}

fn backward_dispatch(
    logits: &Tensor<'_>,
    target: &Tensor<'_>,
    options: &ForwardOptions,
    grad_loss: &Tensor<'_>,
    weights: &[f32],
    grad: &Tensor<'_>,
) -> Result<()> {
    let logit_type = logit_type(logits)?;
    let label_type = label_type(target)?;
    check_same_dtype(grad_loss, logits)?;
    check_same_dtype(grad, logits)?;
    with_types!(logit_type, label_type, |T, L| {
        let size = std::mem::size_of::<T>();
        for input in [logits, target, grad_loss] {
            ptr::check_disjoint(grad, input, size)?;
        }
        backward_into(
            logits.view::<T>()?,
            target.view::<L>()?,
            grad_loss.view::<T>()?,
            weights,
            options,
            grad.view_mut::<T>()?,
        )
    })
}
