//! The CUDA path (feature `cuda`): the kernels of `kernels/`, launched on device memory that
//! the caller allocated (PyTorch, LibTorch, CuPy), on the caller's stream, in the primary
//! context of the handle's device. The C API reaches it through handles made for a CUDA
//! device; the Rust API computes on host memory only.

mod driver;
mod kernels;
mod loss;
mod tensor;

pub(crate) use loss::CudaLoss;

/// Whether the driver loads, initialises and has at least one device.
pub(crate) fn available() -> bool {
    driver::driver().and_then(|api| api.device_count()).is_ok_and(|count| count > 0)
}
