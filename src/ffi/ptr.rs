//! Everything that turns a raw pointer from C into a Rust reference, slice, box or ndarray
//! view. No other module of the C layer casts or dereferences pointers.
//!
//! Each function checks what can be checked (NULL, sizes, alignment, overflow, overlap) and
//! relies on the documented contract of the exported function for the rest: that a non-NULL
//! pointer points to what its type and length say, for the duration of the call.

use super::types::{CbceDataType, CbceTensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use ndarray::{ArrayViewD, ArrayViewMutD, Axis, IxDyn, ShapeBuilder};
use std::ptr::NonNull;

/// The most axes a tensor descriptor may have.
pub(crate) const MAX_NDIM: i32 = 32;

/// `ptr` as a shared reference, or an error naming the argument if it is NULL.
pub(crate) fn reference<'a, T>(ptr: *const T, name: &'static str) -> Result<&'a T> {
    // SAFETY: the caller's contract: a non-NULL pointer points to a valid, aligned T that
    // nothing mutates during the call.
    unsafe { ptr.as_ref() }.ok_or(Error::NullPointer(name))
}

/// `ptr` as an exclusive reference, or an error naming the argument if it is NULL.
pub(crate) fn mutable<'a, T>(ptr: *mut T, name: &'static str) -> Result<&'a mut T> {
    // SAFETY: the caller's contract: a non-NULL pointer points to a valid, aligned T that
    // nothing else accesses during the call.
    unsafe { ptr.as_mut() }.ok_or(Error::NullPointer(name))
}

/// `len` elements at `ptr`; NULL is accepted only when `len` is 0.
pub(crate) fn slice<'a, T>(ptr: *const T, len: usize, name: &'static str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Error::NullPointer(name));
    }
    check_aligned(ptr as usize, std::mem::align_of::<T>(), name)?;
    // SAFETY: the caller's contract: `ptr` points to `len` initialised elements that nothing
    // mutates during the call; NULL and misalignment were ruled out above.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// `len` writable elements at `ptr`; NULL is accepted only when `len` is 0.
pub(crate) fn slice_mut<'a, T>(ptr: *mut T, len: usize, name: &'static str) -> Result<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(Error::NullPointer(name));
    }
    check_aligned(ptr as usize, std::mem::align_of::<T>(), name)?;
    // SAFETY: the caller's contract: `ptr` points to `len` elements that nothing else accesses
    // during the call; NULL and misalignment were ruled out above.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// Moves a value to the heap and hands its ownership to C.
pub(crate) fn into_raw<T>(value: T) -> *mut T {
    Box::into_raw(Box::new(value))
}

/// Takes back ownership of a pointer made by [`into_raw`] and drops it; NULL does nothing.
pub(crate) fn drop_raw<T>(ptr: *mut T) {
    if !ptr.is_null() {
        // SAFETY: the contract of `cbce_free`: the pointer came from `into_raw` and is not used
        // again.
        drop(unsafe { Box::from_raw(ptr) });
    }
}

/// A borrowed tensor descriptor whose shape and strides were read and checked.
pub(crate) struct Tensor<'a> {
    pub name: &'static str,
    pub descriptor: &'a CbceTensor,
    pub shape: Vec<usize>,
    /// Strides in elements (row-major when the descriptor's are NULL).
    pub strides: Vec<isize>,
    /// The lowest and highest element offsets the tensor reaches; `None` if it is empty.
    pub extent: Option<(isize, isize)>,
}

impl<'a> Tensor<'a> {
    /// Reads the descriptor at `ptr` and checks its shape and strides.
    pub(crate) fn new(ptr: *const CbceTensor, name: &'static str) -> Result<Tensor<'a>> {
        let descriptor = reference(ptr, name)?;
        if !(0..=MAX_NDIM).contains(&descriptor.ndim) {
            return Err(Error::invalid_layout(
                name,
                format!("ndim is {} but must be in [0, {MAX_NDIM}]", descriptor.ndim),
            ));
        }
        let ndim = descriptor.ndim as usize;
        let raw_shape = slice(descriptor.shape, ndim, "shape")?;
        let shape = raw_shape
            .iter()
            .enumerate()
            .map(|(axis, &len)| {
                usize::try_from(len).map_err(|_| {
                    Error::invalid_layout(name, format!("extent {len} of axis {axis} is negative"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Axes of extent 0 are left out of the product, so that an empty tensor's other axes
        // also stay within the bounds that an ndarray view of them requires.
        let numel =
            shape.iter().filter(|&&len| len != 0).try_fold(1usize, |n, &len| n.checked_mul(len));
        if numel.is_none_or(|n| n > isize::MAX as usize / 8) {
            return Err(Error::invalid_layout(
                name,
                format!("the element count of shape {shape:?} overflows"),
            ));
        }

        let strides = if descriptor.strides.is_null() {
            row_major_strides(&shape)
        } else {
            slice(descriptor.strides as *const i64, ndim, "strides")?
                .iter()
                .map(|&s| isize::try_from(s).expect("isize is 64 bits on supported targets"))
                .collect()
        };
        let extent = checked_extent(&shape, &strides)
            .ok_or_else(|| Error::invalid_layout(name, "the strides' reach overflows"))?;
        Ok(Tensor { name, descriptor, shape, strides, extent })
    }

    pub(crate) fn dtype(&self) -> DType {
        let CbceDataType { code, bits, lanes } = self.descriptor.dtype;
        DType { code, bits, lanes }
    }

    /// Fails unless the tensor has the same dtype as `logits`.
    pub(crate) fn check_dtype_matches(&self, logits: &Tensor<'_>) -> Result<()> {
        if self.dtype() != logits.dtype() {
            return Err(Error::UnsupportedDtype {
                tensor: self.name,
                dtype: self.dtype().to_string(),
                expected: "the logits' dtype",
            });
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Byte address of element 0, or `None` for a tensor without elements.
    fn origin(&self, element_size: usize) -> Result<Option<usize>> {
        if self.extent.is_none() {
            return Ok(None);
        }
        if self.descriptor.data.is_null() {
            return Err(Error::NullPointer(self.name));
        }
        let address = (self.descriptor.data as usize)
            .checked_add(self.descriptor.byte_offset as usize)
            .ok_or_else(|| Error::invalid_layout(self.name, "data + byte_offset overflows"))?;
        check_aligned(address, element_size, self.name)?;
        Ok(Some(address))
    }

    /// The byte range `[low, high)` the tensor touches, for overlap checks.
    pub(crate) fn byte_range(&self, element_size: usize) -> Result<Option<(usize, usize)>> {
        let Some(origin) = self.origin(element_size)? else { return Ok(None) };
        let (low, high) = self.extent.expect("origin implies extent");
        let start = origin as isize + low * element_size as isize;
        let end = origin as isize + (high + 1) * element_size as isize;
        Ok(Some((start as usize, end as usize)))
    }

    /// An ndarray view of the elements, as type `T`, which the caller has matched against the
    /// descriptor's dtype.
    pub(crate) fn view<T>(&self) -> Result<ArrayViewD<'a, T>> {
        let (lowest, abs_strides, negative) = self.normalised::<T>()?;
        let shape = IxDyn(&self.shape).strides(IxDyn(&abs_strides));
        // SAFETY: the caller's contract for tensor arguments: the descriptor describes live
        // memory of elements of T, unchanged during the call. `lowest` is the lowest element's
        // address, aligned and non-NULL, and with non-negative strides every element lies at
        // or above it, within the extent checked not to overflow.
        let mut view = unsafe { ArrayViewD::from_shape_ptr(shape, lowest.as_ptr()) };
        for axis in negative {
            view.invert_axis(Axis(axis));
        }
        Ok(view)
    }

    /// A mutable ndarray view; fails unless no two elements share memory.
    pub(crate) fn view_mut<T>(&self) -> Result<ArrayViewMutD<'a, T>> {
        self.check_no_self_overlap()?;
        let (lowest, abs_strides, negative) = self.normalised::<T>()?;
        let shape = IxDyn(&self.shape).strides(IxDyn(&abs_strides));
        // SAFETY: as for `view`, and the caller's contract gives this call exclusive access to
        // the elements, which were checked above not to overlap one another.
        let mut view = unsafe { ArrayViewMutD::from_shape_ptr(shape, lowest.as_ptr()) };
        for axis in negative {
            view.invert_axis(Axis(axis));
        }
        Ok(view)
    }

    /// The lowest element's address, the absolute strides, and the axes whose stride is
    /// negative. Axes of extent 1 get stride 0, which ndarray treats alike.
    fn normalised<T>(&self) -> Result<(NonNull<T>, Vec<usize>, Vec<usize>)> {
        let element_size = std::mem::size_of::<T>();
        let Some(origin) = self.origin(element_size)? else {
            // No element is ever read or written, but a view still needs strides that do not
            // overlap: those of the contiguous layout do not.
            let strides = row_major_strides(&self.shape).iter().map(|&s| s as usize).collect();
            return Ok((NonNull::dangling(), strides, Vec::new()));
        };
        let (low, _) = self.extent.expect("origin implies extent");
        let lowest = (origin as isize + low * element_size as isize) as usize as *mut T;
        let lowest = NonNull::new(lowest).ok_or(Error::NullPointer(self.name))?;
        let mut abs_strides = Vec::with_capacity(self.shape.len());
        let mut negative = Vec::new();
        for (axis, (&len, &stride)) in self.shape.iter().zip(&self.strides).enumerate() {
            if len <= 1 {
                abs_strides.push(0);
                continue;
            }
            if stride < 0 {
                negative.push(axis);
            }
            abs_strides.push(stride.unsigned_abs());
        }
        Ok((lowest, abs_strides, negative))
    }

    pub(crate) fn check_no_self_overlap(&self) -> Result<()> {
        let mut axes: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(&len, _)| len > 1)
            .map(|(&len, &stride)| (stride.unsigned_abs(), len))
            .collect();
        if self.len() == 0 {
            return Ok(());
        }
        axes.sort_unstable();
        let mut reach = 0usize;
        for (stride, len) in axes {
            if stride <= reach {
                return Err(Error::invalid_layout(
                    self.name,
                    format!(
                        "strides {:?} for shape {:?} make elements overlap, which an output \
                         cannot",
                        self.strides, self.shape
                    ),
                ));
            }
            reach += stride * (len - 1);
        }
        Ok(())
    }
}

fn check_aligned(address: usize, align: usize, name: &'static str) -> Result<()> {
    if !address.is_multiple_of(align) {
        return Err(Error::invalid_layout(
            name,
            format!("address {address:#x} is not aligned to the element size {align}"),
        ));
    }
    Ok(())
}

fn row_major_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut step = 1isize;
    for axis in (0..shape.len()).rev() {
        strides[axis] = step;
        step = step.saturating_mul(shape[axis].max(1) as isize);
    }
    strides
}

/// [`crate::strided::extent`] with overflow checks: `Some(None)` for an empty tensor.
fn checked_extent(shape: &[usize], strides: &[isize]) -> Option<Option<(isize, isize)>> {
    if shape.contains(&0) {
        return Some(None);
    }
    let limit = isize::MAX / 16;
    let (mut low, mut high) = (0isize, 0isize);
    for (&len, &stride) in shape.iter().zip(strides) {
        let reach = (len as isize - 1).checked_mul(stride)?;
        if reach < 0 {
            low = low.checked_add(reach)?;
        } else {
            high = high.checked_add(reach)?;
        }
    }
    (low > -limit && high < limit).then_some(Some((low, high)))
}

/// Fails if the byte ranges of an output and an input intersect.
pub(crate) fn check_disjoint(
    output: &Tensor<'_>,
    input: &Tensor<'_>,
    element_size: usize,
) -> Result<()> {
    let (Some(out), Some(inp)) = (output.byte_range(element_size)?, input.byte_range_any()?) else {
        return Ok(());
    };
    if out.0 < inp.1 && inp.0 < out.1 {
        return Err(Error::invalid_layout(
            output.name,
            format!("its memory overlaps that of `{}`; outputs must not alias inputs", input.name),
        ));
    }
    Ok(())
}

impl Tensor<'_> {
    /// [`Tensor::byte_range`] with the element size taken from the descriptor's own dtype.
    fn byte_range_any(&self) -> Result<Option<(usize, usize)>> {
        match self.dtype().size_in_bytes() {
            Some(size) => self.byte_range(size),
            None => Ok(None),
        }
    }
}
