//! Tensors in device memory as the CUDA path checks and launches over them: which device they
//! are on, their element types, their shapes against each other (with the CPU path's rules and
//! messages), and the positions of a pass as the kernels' merged axes.

use super::driver::DevicePtr;
use super::kernels::{Positions, Tiling, MAX_AXES, OPERANDS};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ffi::ptr::Tensor;
use crate::ffi::{CBCE_DEVICE_CUDA, CBCE_DEVICE_CUDA_MANAGED};
use crate::layout::Geometry;
use crate::loss::Reduction;

/// Fails unless `tensor` is memory that CUDA device `ordinal` can read and write: device
/// memory of that device, or managed memory.
pub(crate) fn check_device(tensor: &Tensor<'_>, ordinal: i32) -> Result<()> {
    let device = tensor.descriptor.device;
    let on_device = device.device_type == CBCE_DEVICE_CUDA && device.device_id == ordinal;
    if on_device || device.device_type == CBCE_DEVICE_CUDA_MANAGED {
        return Ok(());
    }
    Err(Error::DeviceMismatch {
        tensor: tensor.name,
        found: format!("device type {} id {}", device.device_type, device.device_id),
        expected: format!("cuda device {ordinal}"),
    })
}

/// The device address of element 0 (0 for a tensor without elements), checked for NULL and
/// alignment.
pub(crate) fn address(tensor: &Tensor<'_>, element_size: usize) -> Result<DevicePtr> {
    let Some((start, _)) = tensor.byte_range(element_size)? else { return Ok(0) };
    let (low, _) = tensor.extent.expect("a byte range implies an extent");
    Ok((start as i64 - low as i64 * element_size as i64) as u64)
}

/// The logits' element type, as an index into the kernel tables (f32, f64, f16, bf16).
pub(crate) fn logit_index(tensor: &Tensor<'_>) -> Result<usize> {
    match tensor.dtype() {
        DType::F32 => Ok(0),
        DType::F64 => Ok(1),
        DType::F16 => Ok(2),
        DType::BF16 => Ok(3),
        other => Err(Error::UnsupportedDtype {
            tensor: tensor.name,
            dtype: other.to_string(),
            expected: "float16, bfloat16, float32 or float64",
        }),
    }
}

/// The target's element type, as an index into the kernel tables (i64, i32, u8).
pub(crate) fn label_index(tensor: &Tensor<'_>) -> Result<usize> {
    match tensor.dtype() {
        DType::I64 => Ok(0),
        DType::I32 => Ok(1),
        DType::U8 => Ok(2),
        other => Err(Error::UnsupportedDtype {
            tensor: tensor.name,
            dtype: other.to_string(),
            expected: "int64, int32 or uint8",
        }),
    }
}

/// The class axis of logits against their target, with the CPU path's checks and messages.
pub(crate) fn class_axis(logits: &[usize], target: &[usize], num_classes: usize) -> Result<usize> {
    if logits.is_empty() {
        return Err(Error::ShapeMismatch(
            "logits are 0-dimensional; expected (C), (N, C) or (N, C, d1, ..., dk)".into(),
        ));
    }
    let class_axis = usize::from(logits.len() > 1);
    if logits[class_axis] != num_classes {
        return Err(Error::ShapeMismatch(format!(
            "logits of shape {logits:?} have {} classes along axis {class_axis} but the loss \
             has {num_classes}",
            logits[class_axis]
        )));
    }
    let mut expected = logits.to_vec();
    expected.remove(class_axis);
    if target != expected.as_slice() {
        return Err(Error::ShapeMismatch(format!(
            "target has shape {target:?} but logits of shape {logits:?} need {expected:?}"
        )));
    }
    Ok(class_axis)
}

/// Fails unless the gradient has the logits' shape.
pub(crate) fn check_grad_shape(grad: &[usize], logits: &[usize]) -> Result<()> {
    if grad != logits {
        return Err(Error::ShapeMismatch(format!(
            "gradient has shape {grad:?} but the logits have {logits:?}"
        )));
    }
    Ok(())
}

/// Fails unless a loss (or upstream gradient) tensor fits the reduction: the target's shape
/// for "none", one element otherwise.
pub(crate) fn check_per_call_shape(
    what: &str,
    tensor: &Tensor<'_>,
    target: &[usize],
    reduction: Reduction,
) -> Result<()> {
    match reduction {
        Reduction::None if tensor.shape != target => Err(Error::ShapeMismatch(format!(
            "{what} has shape {:?} but reduction \"none\" needs the target's {target:?}",
            tensor.shape
        ))),
        Reduction::Mean | Reduction::Sum if tensor.len() != 1 => Err(Error::ShapeMismatch(
            format!("{what} has shape {:?} but a reduced loss has one element", tensor.shape),
        )),
        _ => Ok(()),
    }
}

/// Strides of a logits-shaped tensor without the class axis, and the class axis' stride.
pub(crate) fn split_class_axis(strides: &[isize], class_axis: usize) -> (Vec<isize>, isize) {
    let mut positions = strides.to_vec();
    let class_stride = positions.remove(class_axis);
    (positions, class_stride)
}

/// The positions of a pass over `shape`, in which operand k has strides `strides[k]` (or is
/// absent), as the kernels' merged axes.
pub(crate) struct Pass {
    pub positions: Positions,
    /// Number of positions.
    pub count: usize,
    /// Length of the innermost merged axis.
    pub inner: usize,
}

impl Pass {
    pub(crate) fn new(shape: &[usize], strides: [Option<&[isize]>; OPERANDS]) -> Pass {
        let geometry = Geometry::new(shape, strides);
        let (dims, merged) = geometry.axes();
        let mut positions =
            Positions { axes: 1, dims: [0; MAX_AXES], strides: [[0; MAX_AXES]; OPERANDS] };
        if dims.is_empty() {
            // A single position: one axis of length 1.
            positions.dims[0] = 1;
        } else {
            positions.axes = dims.len() as i64;
            for (axis, &len) in dims.iter().enumerate() {
                positions.dims[axis] = len as i64;
            }
            for (strides, operand) in positions.strides.iter_mut().zip(merged) {
                for (slot, &stride) in strides.iter_mut().zip(operand) {
                    *slot = stride as i64;
                }
            }
        }
        let inner = positions.dims[positions.axes as usize - 1] as usize;
        Pass { positions, count: geometry.positions(), inner }
    }

    /// Operand k's stride along the innermost axis.
    pub(crate) fn inner_stride(&self, k: usize) -> i64 {
        self.positions.strides[k][self.positions.axes as usize - 1]
    }

    /// Tiles of `tile_len` positions along the innermost axis.
    pub(crate) fn tiling(&self, tile_len: usize) -> Tiling {
        if self.count == 0 {
            return Tiling { tile_len: tile_len as i64, tiles_per_line: 1, tiles: 0 };
        }
        let tiles_per_line = self.inner.div_ceil(tile_len);
        let lines = self.count / self.inner;
        Tiling {
            tile_len: tile_len as i64,
            tiles_per_line: tiles_per_line as i64,
            tiles: (lines * tiles_per_line) as i64,
        }
    }
}
