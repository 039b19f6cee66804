//! Class-balanced cross-entropy: a softmax cross-entropy whose class weights are the inverse of
//! class prevalences estimated online with an exponential moving average of the labels seen.
//!
//! The crate is at once a Rust library ([`ClassBalancedLoss`]) and a C library (`libcbce`,
//! header `include/cbce.h`) whose functions are a thin layer over it. Behaviour follows the
//! `ClassBalancedCrossEntropyLoss` of the `vision-architectures` package, with the deliberate
//! differences the README lists.

mod config;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod dtype;
mod error;
pub mod ffi;
mod isa;
mod layout;
mod loss;
mod math;
mod prevalence;
mod simd;
mod strided;
mod weights;

pub use config::{Config, Device, MAX_CLASSES};
pub use dtype::{DType, Label, Logit, Real};
pub use error::{Error, Result, Status};
pub use loss::{
    backward, backward_into, ClassBalancedLoss, ForwardOptions, ForwardOutput, ForwardSummary,
    Reduction,
};
pub use prevalence::Prevalences;
pub use weights::class_weights;

/// Re-exported so that callers name the same half-precision types as the crate.
pub use half::{bf16, f16};
