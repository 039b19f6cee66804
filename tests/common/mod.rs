//! Helpers shared by the integration tests: element types as DLPack names them, strided tensors
//! in memory of any layout with their descriptors, a handle that frees itself, a small seeded
//! generator, and (in `reference`) the plain float64 implementation the tests compare against.
//!
//! Nothing here calls the crate's internals: the tests reach the library only through the
//! exported C functions, so what they check is what a C caller gets.

#![allow(dead_code)] // Each test file uses a different part of these helpers.

pub mod harness;
pub mod reference;

use cbce::ffi::*;
use cbce::Status;
use ndarray::{ArrayD, ArrayViewMutD, Axis, Dimension, IxDyn, Slice};
use std::ffi::{c_void, CStr};

/// A logits element type, converted without the crate's help.
pub trait Float: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    const CODE: u8;
    const BITS: u8;
    /// Relative rounding error of one value written in this type (half an ulp).
    const ROUNDING: f64;
    /// Spacing of this type's smallest subnormal values: the absolute rounding floor.
    const TINY: f64;
    const NAME: &'static str;
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Float for f32 {
    const CODE: u8 = CBCE_DTYPE_FLOAT;
    const BITS: u8 = 32;
    const ROUNDING: f64 = f32::EPSILON as f64 / 2.0;
    const TINY: f64 = 1.5e-45;
    const NAME: &'static str = "float32";
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    const CODE: u8 = CBCE_DTYPE_FLOAT;
    const BITS: u8 = 64;
    const ROUNDING: f64 = f64::EPSILON / 2.0;
    const TINY: f64 = 5e-324;
    const NAME: &'static str = "float64";
    fn from_f64(value: f64) -> Self {
        value
    }
    fn to_f64(self) -> f64 {
        self
    }
}

impl Float for cbce::f16 {
    const CODE: u8 = CBCE_DTYPE_FLOAT;
    const BITS: u8 = 16;
    const ROUNDING: f64 = 1.0 / 2048.0;
    const TINY: f64 = 6.0e-8;
    const NAME: &'static str = "float16";
    fn from_f64(value: f64) -> Self {
        cbce::f16::from_f64(value)
    }
    fn to_f64(self) -> f64 {
        cbce::f16::to_f64(self)
    }
}

impl Float for cbce::bf16 {
    const CODE: u8 = CBCE_DTYPE_BFLOAT;
    const BITS: u8 = 16;
    const ROUNDING: f64 = 1.0 / 256.0;
    const TINY: f64 = 1.0e-40;
    const NAME: &'static str = "bfloat16";
    fn from_f64(value: f64) -> Self {
        cbce::bf16::from_f64(value)
    }
    fn to_f64(self) -> f64 {
        cbce::bf16::to_f64(self)
    }
}

/// A target element type.
pub trait Label: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    const CODE: u8;
    const BITS: u8;
    const NAME: &'static str;
    /// The label as this type stores it; values outside its range wrap as a C cast does.
    fn from_i64(value: i64) -> Self;
    fn to_i64(self) -> i64;
}

impl Label for i64 {
    const CODE: u8 = CBCE_DTYPE_INT;
    const BITS: u8 = 64;
    const NAME: &'static str = "int64";
    fn from_i64(value: i64) -> Self {
        value
    }
    fn to_i64(self) -> i64 {
        self
    }
}

impl Label for i32 {
    const CODE: u8 = CBCE_DTYPE_INT;
    const BITS: u8 = 32;
    const NAME: &'static str = "int32";
    fn from_i64(value: i64) -> Self {
        value as i32
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
}

impl Label for u8 {
    const CODE: u8 = CBCE_DTYPE_UINT;
    const BITS: u8 = 8;
    const NAME: &'static str = "uint8";
    fn from_i64(value: i64) -> Self {
        value as u8
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
}

pub fn dtype(code: u8, bits: u8) -> CbceDataType {
    CbceDataType { code, bits, lanes: 1 }
}

pub const CPU: CbceDevice = CbceDevice { device_type: CBCE_DEVICE_CPU, device_id: 0 };

/// How a tensor lies in memory, relative to its logical (C-order) shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Memory axis i (outermost first) holds logical axis `order[i]`.
    pub order: Vec<usize>,
    /// Per logical axis: take every `step`-th element of a padded memory axis.
    pub step: Vec<usize>,
    /// Per logical axis: walk the memory axis backwards (a negative stride).
    pub reversed: Vec<bool>,
    /// Per logical axis: stride 0, one element in memory for the whole axis (inputs only).
    pub broadcast: Vec<bool>,
    /// Elements before the tensor's own memory, reached through `byte_offset`.
    pub pad_front: usize,
}

impl Layout {
    pub fn contiguous(rank: usize) -> Layout {
        Layout {
            order: (0..rank).collect(),
            step: vec![1; rank],
            reversed: vec![false; rank],
            broadcast: vec![false; rank],
            pad_front: 0,
        }
    }

    /// A random layout; broadcast axes only when `allow_broadcast` (never for outputs).
    pub fn random(rng: &mut Prng, rank: usize, allow_broadcast: bool) -> Layout {
        let mut order: Vec<usize> = (0..rank).collect();
        if rng.chance(0.6) {
            rng.shuffle(&mut order);
        }
        Layout {
            order,
            step: (0..rank).map(|_| if rng.chance(0.25) { 2 } else { 1 }).collect(),
            reversed: (0..rank).map(|_| rng.chance(0.25)).collect(),
            broadcast: (0..rank).map(|_| allow_broadcast && rng.chance(0.15)).collect(),
            pad_front: if rng.chance(0.3) { rng.below(5) as usize } else { 0 },
        }
    }

    /// The channels-last layout of an (N, C, d1, ..., dk) tensor: C varies fastest.
    pub fn channels_last(rank: usize) -> Layout {
        let mut layout = Layout::contiguous(rank);
        if rank > 2 {
            layout.order = std::iter::once(0).chain(2..rank).chain(std::iter::once(1)).collect();
        }
        layout
    }
}

/// Makes `values` constant along the broadcast axes of `layout`, so a stride-0 tensor can
/// hold them.
pub fn broadcast_consistent<T: Copy>(values: &mut ArrayD<T>, layout: &Layout) {
    for (axis, &broadcast) in layout.broadcast.iter().enumerate() {
        if broadcast && values.shape()[axis] > 1 {
            let first = values.index_axis(Axis(axis), 0).to_owned();
            for mut lane in values.axis_iter_mut(Axis(axis)) {
                lane.assign(&first);
            }
        }
    }
}

/// A tensor in memory it owns, laid out as a `Layout` says, with its descriptor's arrays.
#[derive(Debug, Clone)]
pub struct Strided<T> {
    pub memory: Vec<T>,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
    /// Element 0's index in `memory`.
    pub offset: usize,
    pub code: u8,
    pub bits: u8,
}

impl<T: Copy> Strided<T> {
    /// `values` (which must be constant along broadcast axes) in memory laid out as `layout`
    /// says; memory that no element uses holds `fill`.
    pub fn new(values: &ArrayD<T>, layout: &Layout, fill: T, code: u8, bits: u8) -> Strided<T> {
        let rank = values.ndim();
        let shape = values.shape().to_vec();
        // An axis of extent 0 has no element to share, so it is never broadcast.
        let broadcast: Vec<bool> = (0..rank).map(|a| layout.broadcast[a] && shape[a] > 0).collect();
        let memory_dims: Vec<usize> = layout
            .order
            .iter()
            .map(|&axis| if broadcast[axis] { 1 } else { shape[axis] * layout.step[axis] })
            .collect();
        let len: usize = memory_dims.iter().product();
        let mut memory = vec![fill; layout.pad_front + len];
        let base = memory.as_ptr() as usize;

        let mut view =
            ArrayViewMutD::from_shape(IxDyn(&memory_dims), &mut memory[layout.pad_front..])
                .expect("memory of the padded shape");
        view.slice_each_axis_inplace(|description| {
            let axis = layout.order[description.axis.index()];
            if broadcast[axis] {
                return Slice::new(0, None, 1);
            }
            let step = layout.step[axis] as isize;
            Slice::new(0, None, if layout.reversed[axis] { -step } else { step })
        });
        let mut inverse = vec![0; rank];
        for (memory_axis, &axis) in layout.order.iter().enumerate() {
            inverse[axis] = memory_axis;
        }
        let mut view = view.permuted_axes(IxDyn(&inverse));
        let first = values.slice_each_axis(|description| {
            if broadcast[description.axis.index()] {
                Slice::new(0, Some(1), 1)
            } else {
                Slice::new(0, None, 1)
            }
        });
        view.assign(&first);
        let strides = view
            .strides()
            .iter()
            .enumerate()
            .map(|(axis, &s)| if broadcast[axis] { 0 } else { s as i64 })
            .collect();
        let element = std::mem::size_of::<T>();
        let offset = if len == 0 { 0 } else { (view.as_ptr() as usize - base) / element };

        Strided {
            memory,
            shape: shape.iter().map(|&d| d as i64).collect(),
            strides,
            offset,
            code,
            bits,
        }
    }

    /// The descriptor of this tensor. The library writes through it only when it is passed as
    /// an output, which needs `&mut self` at the call (see [`Strided::descriptor_mut`]).
    pub fn descriptor(&self) -> CbceTensor {
        CbceTensor {
            data: self.memory.as_ptr() as *mut c_void,
            device: CPU,
            ndim: self.shape.len() as i32,
            dtype: dtype(self.code, self.bits),
            shape: self.shape.as_ptr() as *mut i64,
            strides: self.strides.as_ptr() as *mut i64,
            byte_offset: (self.offset * std::mem::size_of::<T>()) as u64,
        }
    }

    /// The descriptor of this tensor as an output, its data pointer made from exclusive access.
    pub fn descriptor_mut(&mut self) -> CbceTensor {
        let mut descriptor = self.descriptor();
        descriptor.data = self.memory.as_mut_ptr() as *mut c_void;
        descriptor
    }

    /// The elements in logical order.
    pub fn logical(&self) -> ArrayD<T> {
        let shape: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        ArrayD::from_shape_fn(IxDyn(&shape), |index| {
            let mut at = self.offset as i64;
            for (axis, &i) in index.slice().iter().enumerate() {
                at += i as i64 * self.strides[axis];
            }
            self.memory[at as usize]
        })
    }

    /// The raw bytes of all of the memory, to check that nothing was written.
    pub fn bytes(&self) -> Vec<u8> {
        bytes_of(&self.memory)
    }
}

/// A contiguous tensor of `values`.
pub fn contiguous<T: Copy>(values: &ArrayD<T>, fill: T, code: u8, bits: u8) -> Strided<T> {
    Strided::new(values, &Layout::contiguous(values.ndim()), fill, code, bits)
}

pub fn logits_tensor<T: Float>(values: &ArrayD<T>, layout: &Layout) -> Strided<T> {
    Strided::new(values, layout, T::from_f64(-7777.0), T::CODE, T::BITS)
}

pub fn target_tensor<L: Label>(values: &ArrayD<L>, layout: &Layout) -> Strided<L> {
    Strided::new(values, layout, L::from_i64(77), L::CODE, L::BITS)
}

/// The bytes of a slice of plain numbers.
pub fn bytes_of<T: Copy>(values: &[T]) -> Vec<u8> {
    let len = std::mem::size_of_val(values);
    // SAFETY: the element types used here (integers and floats) have no padding bytes, so all
    // `len` bytes of the slice are initialised.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), len) }.to_vec()
}

/// This thread's last error message.
pub fn last_message() -> String {
    // SAFETY: the library returns this thread's live, NUL-terminated message.
    unsafe { CStr::from_ptr(cbce_last_error_message()) }.to_string_lossy().into_owned()
}

/// Fails with the call's message unless `status` is OK.
#[track_caller]
pub fn ok(status: Status) {
    assert_eq!(status, Status::Ok, "{}", last_message());
}

/// A handle made by `cbce_new`, freed on drop.
pub struct Handle(pub *mut CbceLoss);

// SAFETY: the library documents a handle as safe to use from several threads at once.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Handle {
    pub fn new(num_classes: u64, ema_decay: f64, min_prevalence: f64) -> Handle {
        let config = CbceConfig { num_classes, ema_decay, min_prevalence, device: CPU };
        let mut loss = std::ptr::null_mut();
        // SAFETY: both pointers point to live locals.
        ok(unsafe { cbce_new(&config, &mut loss) });
        Handle(loss)
    }

    pub fn ptr(&self) -> *const CbceLoss {
        self.0
    }

    pub fn num_classes(&self) -> usize {
        let mut config = cbce_config_default();
        // SAFETY: a live handle and a local.
        ok(unsafe { cbce_get_config(self.0, &mut config) });
        config.num_classes as usize
    }

    /// The state blob, from `cbce_get_state`.
    pub fn state(&self) -> Vec<u8> {
        let mut size = 0usize;
        // SAFETY: a live handle and a local.
        ok(unsafe { cbce_state_size(self.0, &mut size) });
        let mut buffer = vec![0u8; size];
        let mut written = 0usize;
        // SAFETY: `buffer` has `size` writable bytes.
        ok(unsafe { cbce_get_state(self.0, buffer.as_mut_ptr(), size, &mut written) });
        assert_eq!(written, size);
        buffer
    }

    pub fn set_state(&self, bytes: &[u8]) -> Status {
        // SAFETY: `bytes` is a live slice of its length.
        unsafe { cbce_set_state(self.0, bytes.as_ptr(), bytes.len()) }
    }

    pub fn update_from_counts(&self, counts: &[i64]) {
        // SAFETY: `counts` is a live slice of its length.
        ok(unsafe { cbce_update_from_counts(self.0, counts.as_ptr(), counts.len()) });
    }

    pub fn prevalences(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.num_classes()];
        // SAFETY: `out` has C writable floats.
        ok(unsafe { cbce_prevalences(self.0, out.as_mut_ptr(), out.len()) });
        out
    }

    pub fn weights(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.num_classes()];
        // SAFETY: `out` has C writable floats.
        ok(unsafe { cbce_weights(self.0, out.as_mut_ptr(), out.len()) });
        out
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from cbce_new and is freed once, here.
        unsafe { cbce_free(self.0) }
    }
}

/// The per-class values of a state blob (NaN for unseen), read as its documented layout says:
/// a 24-byte header, one little-endian f64 per class, an 8-byte checksum.
pub fn state_values(blob: &[u8]) -> Vec<f64> {
    blob[24..blob.len() - 8]
        .chunks_exact(8)
        .map(|chunk| f64::from_le_bytes(chunk.try_into().unwrap()))
        .collect()
}

/// FNV-1a 64, the state blob's documented checksum, written here from its definition.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Rewrites a blob's checksum so that it matches its (possibly altered) body.
pub fn reseal(blob: &mut [u8]) {
    let body = blob.len() - 8;
    let checksum = fnv1a64(&blob[..body]);
    blob[body..].copy_from_slice(&checksum.to_le_bytes());
}

/// A small seeded generator (SplitMix64): the same seed gives the same cases everywhere.
#[derive(Debug, Clone)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [low, high].
    pub fn range(&mut self, low: i64, high: i64) -> i64 {
        low + self.below((high - low + 1) as u64) as i64
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}
