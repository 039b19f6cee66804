//! Element types: the logits' floating-point types with the precision they compute in, the
//! target's integer label types, and the DLPack codes that name them at the C boundary.

use half::{bf16, f16};
use std::fmt;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// An element type as DLPack names it: type code, bits and lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DType {
    /// DLPack type code: 0 int, 1 uint, 2 float, 4 bfloat.
    pub code: u8,
    /// Bits per lane.
    pub bits: u8,
    /// Lanes per element; this library accepts only 1.
    pub lanes: u16,
}

impl DType {
    pub const F16: DType = DType::scalar(CODE_FLOAT, 16);
    pub const BF16: DType = DType::scalar(CODE_BFLOAT, 16);
    pub const F32: DType = DType::scalar(CODE_FLOAT, 32);
    pub const F64: DType = DType::scalar(CODE_FLOAT, 64);
    pub const I64: DType = DType::scalar(CODE_INT, 64);
    pub const I32: DType = DType::scalar(CODE_INT, 32);
    pub const U8: DType = DType::scalar(CODE_UINT, 8);

    const fn scalar(code: u8, bits: u8) -> DType {
        DType { code, bits, lanes: 1 }
    }

    /// Bytes per element, if the type is one this library knows.
    pub fn size_in_bytes(self) -> Option<usize> {
        [DType::F16, DType::BF16, DType::F32, DType::F64, DType::I64, DType::I32, DType::U8]
            .contains(&self)
            .then_some(self.bits as usize / 8)
    }
}

const CODE_INT: u8 = 0;
const CODE_UINT: u8 = 1;
const CODE_FLOAT: u8 = 2;
const CODE_BFLOAT: u8 = 4;

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match (self.code, self.bits) {
            (CODE_INT, _) => "int",
            (CODE_UINT, _) => "uint",
            (CODE_FLOAT, _) => "float",
            (CODE_BFLOAT, _) => "bfloat",
            _ => return write!(f, "code {} bits {} lanes {}", self.code, self.bits, self.lanes),
        };
        write!(f, "{name}{}", self.bits)?;
        if self.lanes != 1 {
            write!(f, "x{}", self.lanes)?;
        }
        Ok(())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// The precision a computation runs in: float32, or float64 for float64 logits.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + sealed::Sealed
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `candidate` if it is larger than `self`, else `self`: a running maximum that skips a NaN
    /// candidate (a NaN in a row still reaches the loss through the sum of exponentials). One
    /// vector instruction on x86.
    fn larger(self, candidate: Self) -> Self;
    /// e^x for x <= 0 as the softmax uses it (also exact enough for any x), vectorisable.
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl sealed::Sealed for f32 {}
impl sealed::Sealed for f64 {}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn larger(self, candidate: Self) -> Self {
        if candidate > self {
            candidate
        } else {
            self
        }
    }
    #[inline(always)]
    fn exp(self) -> Self {
        crate::math::exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        crate::math::ln_f32(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(value: f64) -> Self {
        value
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn larger(self, candidate: Self) -> Self {
        if candidate > self {
            candidate
        } else {
            self
        }
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

/// A logits element type: float16, bfloat16, float32 or float64.
///
/// Half-precision logits are read into float32 and computed there; results are written back in
/// the logits' own type.
pub trait Logit: Copy + Send + Sync + sealed::Sealed + 'static {
    /// The precision this type computes in.
    type Acc: Real;
    /// The DLPack name of this type.
    const DTYPE: DType;
    fn to_acc(self) -> Self::Acc;
    fn from_acc(value: Self::Acc) -> Self;
}

impl sealed::Sealed for f16 {}
impl sealed::Sealed for bf16 {}

impl Logit for f32 {
    type Acc = f32;
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(value: f32) -> Self {
        value
    }
}

impl Logit for f64 {
    type Acc = f64;
    const DTYPE: DType = DType::F64;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(value: f64) -> Self {
        value
    }
}

impl Logit for f16 {
    type Acc = f32;
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(value: f32) -> Self {
        f16::from_f32(value)
    }
}

impl Logit for bf16 {
    type Acc = f32;
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

/// A target element type: int64, int32 or uint8 class labels.
pub trait Label: Copy + Send + Sync + sealed::Sealed + 'static {
    /// The DLPack name of this type.
    const DTYPE: DType;
    fn to_i64(self) -> i64;
}

impl sealed::Sealed for i64 {}
impl sealed::Sealed for i32 {}
impl sealed::Sealed for u8 {}

impl Label for i64 {
    const DTYPE: DType = DType::I64;
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self
    }
}

impl Label for i32 {
    const DTYPE: DType = DType::I32;
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
}

impl Label for u8 {
    const DTYPE: DType = DType::U8;
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
}
