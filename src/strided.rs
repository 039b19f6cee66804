//! Strided tensor memory as the CPU core reads and writes it: the one module of the core that
//! offsets and dereferences raw pointers.
//!
//! A [`Source`] or [`Sink`] is made from an ndarray view, so the memory is valid for the view's
//! lifetime. Reads check the element offset against the view's extent. Writes cannot be checked
//! that way for races, so they are `unsafe` with one contract: no two threads write one element.

use crate::dtype::{Logit, Real};
use crate::simd::{F32Lanes, LANES};
use ndarray::{ArrayViewD, ArrayViewMutD};
use std::any::TypeId;
use std::marker::PhantomData;

/// The lowest and highest element offsets a shape and strides reach, or `None` if empty.
pub(crate) fn extent(shape: &[usize], strides: &[isize]) -> Option<(isize, isize)> {
    if shape.contains(&0) {
        return None;
    }
    let (mut low, mut high) = (0isize, 0isize);
    for (&len, &stride) in shape.iter().zip(strides) {
        let reach = (len as isize - 1) * stride;
        if reach < 0 {
            low += reach;
        } else {
            high += reach;
        }
    }
    Some((low, high))
}

/// Read access to the elements of a view, by element offset from its first element.
pub(crate) struct Source<'a, T> {
    ptr: *const T,
    low: isize,
    high: isize,
    _borrow: PhantomData<&'a [T]>,
}

// SAFETY: a Source only reads `T: Sync` data that the borrowed view keeps alive and unchanged.
unsafe impl<T: Sync> Send for Source<'_, T> {}
// SAFETY: as above; shared reads from several threads are what `Sync` data allows.
unsafe impl<T: Sync> Sync for Source<'_, T> {}

impl<'a, T: Copy> Source<'a, T> {
    /// Reads from `view`; returns it with its strides.
    pub(crate) fn new(view: &ArrayViewD<'a, T>) -> (Source<'a, T>, Vec<isize>) {
        let strides = view.strides().to_vec();
        let (low, high) = extent(view.shape(), &strides).unwrap_or((0, -1));
        let source = Source { ptr: view.as_ptr(), low, high, _borrow: PhantomData };
        (source, strides)
    }

    /// The element at `offset`. Panics if the offset is outside the view.
    #[inline(always)]
    pub(crate) fn get(&self, offset: isize) -> T {
        assert!(self.low <= offset && offset <= self.high, "read outside the tensor");
        // SAFETY: the offset lies within the view's extent, which the view borrows for 'a.
        unsafe { *self.ptr.offset(offset) }
    }

    /// `len` consecutive elements starting at `offset`. Panics if they leave the view.
    #[inline(always)]
    pub(crate) fn slice(&self, offset: isize, len: usize) -> &'a [T] {
        if len == 0 {
            return &[];
        }
        assert!(
            self.low <= offset && offset + len as isize - 1 <= self.high,
            "read outside the tensor"
        );
        // SAFETY: the whole run lies within the view's extent, borrowed for 'a, and nothing
        // writes to a Source's memory while the borrow lasts.
        unsafe { std::slice::from_raw_parts(self.ptr.offset(offset), len) }
    }
}

impl<T> Source<'_, T> {
    /// The address of the element at `offset` (nothing is read).
    pub(crate) fn address(&self, offset: isize) -> usize {
        self.ptr.wrapping_offset(offset) as usize
    }

    /// Asks the CPU to start loading the cache line of the element at `offset` into the L1
    /// cache (a hint: any offset is allowed, nothing is read).
    #[inline(always)]
    pub(crate) fn prefetch(&self, offset: isize) {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        self.prefetch_with::<{ std::arch::x86_64::_MM_HINT_T0 }>(offset);
        #[cfg(any(not(target_arch = "x86_64"), miri))]
        let _ = offset;
    }

    /// As [`Source::prefetch`], into the L2 cache.
    #[inline(always)]
    pub(crate) fn prefetch_l2(&self, offset: isize) {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        self.prefetch_with::<{ std::arch::x86_64::_MM_HINT_T1 }>(offset);
        #[cfg(any(not(target_arch = "x86_64"), miri))]
        let _ = offset;
    }

    #[cfg(all(target_arch = "x86_64", not(miri)))]
    #[inline(always)]
    fn prefetch_with<const HINT: i32>(&self, offset: isize) {
        let address = self.ptr.wrapping_offset(offset).cast::<i8>();
        // SAFETY: a prefetch is a hint that never faults, whatever the address; SSE is part of
        // every x86_64 CPU.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(address) }
    }
}

/// Write access to the elements of a mutable view, by element offset from its first element.
pub(crate) struct Sink<'a, T> {
    ptr: *mut T,
    low: isize,
    high: isize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: a Sink hands out writes to disjoint elements only (the contract of `put` and
// `slice_mut`), so moving it to or sharing it between threads cannot create a data race.
unsafe impl<T: Send> Send for Sink<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Sink<'_, T> {}

impl<T> Sink<'_, T> {
    /// The address of the element at `offset` (nothing is written).
    pub(crate) fn address(&self, offset: isize) -> usize {
        self.ptr.wrapping_offset(offset) as usize
    }
}

impl<'a, T: Copy> Sink<'a, T> {
    /// Writes into `view`, whose elements ndarray guarantees not to overlap; returns it with its
    /// strides.
    pub(crate) fn new(view: &mut ArrayViewMutD<'a, T>) -> (Sink<'a, T>, Vec<isize>) {
        let strides = view.strides().to_vec();
        let (low, high) = extent(view.shape(), &strides).unwrap_or((0, -1));
        let sink = Sink { ptr: view.as_mut_ptr(), low, high, _borrow: PhantomData };
        (sink, strides)
    }

    /// Writes `value` at `offset`. Panics if the offset is outside the view.
    ///
    /// # Safety
    /// No other thread reads or writes the element at `offset` during the call.
    #[inline(always)]
    pub(crate) unsafe fn put(&self, offset: isize, value: T) {
        assert!(self.low <= offset && offset <= self.high, "write outside the tensor");
        // SAFETY: in bounds of the exclusively borrowed view; the caller rules out races.
        unsafe { *self.ptr.offset(offset) = value }
    }

    /// `len` consecutive elements starting at `offset`, to write. Panics if they leave the view.
    ///
    /// # Safety
    /// While the slice lives, no other reference to or write of those elements exists.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)] // Exclusivity is the caller's contract, as documented.
    pub(crate) unsafe fn slice_mut(&self, offset: isize, len: usize) -> &mut [T] {
        if len == 0 {
            return &mut [];
        }
        assert!(
            self.low <= offset && offset + len as isize - 1 <= self.high,
            "write outside the tensor"
        );
        // SAFETY: in bounds of the exclusively borrowed view; the caller guarantees the run is
        // not aliased while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.offset(offset), len) }
    }
}

impl<T: Copy + 'static> Sink<'_, T> {
    /// Writes `convert(values[i])` to the `values.len()` consecutive elements at `offset`,
    /// through `staging` (at least as long) unless no conversion is needed. Float32 rows are
    /// written with non-temporal stores, which skip reading the destination's cache lines
    /// first: a gradient is written once and not read back by this pass. Call [`fence`] before
    /// the pass ends so that those stores are visible to other threads.
    ///
    /// # Safety
    /// As [`Sink::slice_mut`]: no other reference to or write of those elements exists.
    #[inline(always)]
    pub(crate) unsafe fn write_row<A: Copy + 'static>(
        &self,
        offset: isize,
        values: &[A],
        staging: &mut [T],
        convert: impl Fn(A) -> T,
    ) {
        // SAFETY: the caller's contract is slice_mut's.
        let out = unsafe { self.slice_mut(offset, values.len()) };
        if TypeId::of::<T>() == TypeId::of::<f32>() && TypeId::of::<A>() == TypeId::of::<f32>() {
            // SAFETY: T and A are both f32, so both slices are float32 slices of their length.
            let (out, values) = unsafe {
                (
                    std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<f32>(), out.len()),
                    std::slice::from_raw_parts(values.as_ptr().cast::<f32>(), values.len()),
                )
            };
            stream_f32(out, values);
            return;
        }
        let staging = &mut staging[..values.len()];
        for (slot, &value) in staging.iter_mut().zip(values) {
            *slot = convert(value);
        }
        out.copy_from_slice(staging);
    }
}

/// A logit in float32, the precision of the lane kernels (exact for every type but float64).
#[inline(always)]
pub(crate) fn to_single<T: Logit>(x: T) -> f32 {
    x.to_acc().to_f64() as f32
}

/// A float32 result in the logits' type.
#[inline(always)]
pub(crate) fn from_single<T: Logit>(x: f32) -> T {
    T::from_acc(T::Acc::from_f64(x as f64))
}

impl<T: Logit> Source<'_, T> {
    /// The `len <= LANES` elements from `offset` as float32 lanes, the rest 0. Panics if they
    /// leave the view.
    #[inline(always)]
    pub(crate) fn read_lanes<V: F32Lanes>(&self, offset: isize, len: usize) -> V {
        let run = self.slice(offset, len);
        if len == LANES && TypeId::of::<T>() == TypeId::of::<f32>() {
            // SAFETY: T is f32 and the run holds LANES of them.
            return unsafe { V::load(run.as_ptr().cast::<f32>()) };
        }
        let mut lanes = [0.0f32; LANES];
        for (lane, x) in lanes.iter_mut().zip(run) {
            *lane = to_single(*x);
        }
        V::from_array(&lanes)
    }
}

impl<T: Logit> Sink<'_, T> {
    /// Writes the first `len <= LANES` lanes of `values` to the consecutive elements at
    /// `offset`. A whole vector of float32 that starts on a cache line goes out as
    /// non-temporal stores, as in [`Sink::write_row`]; call [`fence`] before the pass ends.
    /// Panics if they leave the view.
    ///
    /// # Safety
    /// As [`Sink::slice_mut`]: no other reference to or write of those elements exists.
    #[inline(always)]
    pub(crate) unsafe fn write_lanes<V: F32Lanes>(&self, offset: isize, len: usize, values: V) {
        // SAFETY: the caller's contract is slice_mut's.
        let out = unsafe { self.slice_mut(offset, len) };
        if len == LANES && TypeId::of::<T>() == TypeId::of::<f32>() {
            let target = out.as_mut_ptr().cast::<f32>();
            // SAFETY: T is f32 and the run holds LANES of them; streaming needs the alignment
            // checked first.
            unsafe {
                if (target as usize).is_multiple_of(CACHE_LINE) {
                    values.stream(target)
                } else {
                    values.store(target)
                }
            }
            return;
        }
        for (slot, &value) in out.iter_mut().zip(&values.to_array()) {
            *slot = from_single(value);
        }
    }
}

/// Bytes of a cache line.
pub(crate) const CACHE_LINE: usize = 64;

/// Makes the non-temporal stores of [`Sink::write_row`] so far visible before later stores.
#[inline(always)]
pub(crate) fn fence() {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: SSE is part of every x86_64 CPU; a fence has no other effect.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
}

/// Copies `values` into `out` (same length), the aligned middle with non-temporal stores.
#[inline(always)]
fn stream_f32(out: &mut [f32], values: &[f32]) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, detected just above.
            return unsafe { stream_f32_avx512(out, values) };
        }
    }
    out.copy_from_slice(values);
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
#[target_feature(enable = "avx512f")]
unsafe fn stream_f32_avx512(out: &mut [f32], values: &[f32]) {
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_stream_ps};
    const LANES: usize = 16;
    let misalignment = out.as_ptr().align_offset(64).min(out.len());
    let (head, rest) = out.split_at_mut(misalignment);
    let (head_values, rest_values) = values.split_at(misalignment);
    head.copy_from_slice(head_values);
    let body = rest.len() / LANES * LANES;
    for start in (0..body).step_by(LANES) {
        // SAFETY: `start + 16 <= body <= rest.len() == rest_values.len()`, and `rest` begins on
        // a 64-byte boundary, so every stream target is aligned as the instruction requires.
        unsafe {
            let lane = _mm512_loadu_ps(rest_values.as_ptr().add(start));
            _mm512_stream_ps(rest.as_mut_ptr().add(start), lane);
        }
    }
    rest[body..].copy_from_slice(&rest_values[body..]);
}
