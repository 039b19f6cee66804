//! The crate's one error type and the status codes it maps to at the C boundary.
//!
//! Every fallible operation returns [`Error`], whose message names the offending data (which
//! label at which position, which shape against which). The C layer turns it into a
//! [`Status`] plus that message; the numeric values of [`Status`] never change meaning.

use std::fmt;

/// A result whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate. Messages are lowercase and carry their data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A required pointer argument was NULL (C API only).
    #[error("argument `{0}` is NULL")]
    NullPointer(&'static str),

    /// The configuration cannot make a loss.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// An argument other than a tensor is out of its domain.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument { name: &'static str, reason: String },

    /// A tensor's element type is not one this operation accepts.
    #[error("unsupported dtype for `{tensor}`: {dtype}; expected {expected}")]
    UnsupportedDtype { tensor: &'static str, dtype: String, expected: &'static str },

    /// Shapes of tensors do not fit together or do not fit the loss.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),

    /// A tensor's memory layout cannot be used: bad strides, misaligned data, overflow.
    #[error("invalid layout of `{tensor}`: {reason}")]
    InvalidLayout { tensor: &'static str, reason: String },

    /// A label that is neither in `[0, num_classes)` nor the ignore index.
    #[error(
        "label {label} at position {position:?} of the target is outside [0, {num_classes}) \
         and is not the ignore index ({ignore_index})"
    )]
    LabelOutOfRange { label: i64, position: Vec<usize>, num_classes: usize, ignore_index: i64 },

    /// A caller's buffer does not have the length the operation needs.
    #[error("buffer `{name}` has length {actual} but {expected} is needed")]
    BufferLength { name: &'static str, expected: usize, actual: usize },

    /// A saved state or a count vector that cannot be applied.
    #[error("invalid state: {0}")]
    InvalidState(String),

    /// A tensor lives on a device this loss does not compute on.
    #[error("`{tensor}` is on {found} but the loss computes on {expected}")]
    DeviceMismatch { tensor: &'static str, found: String, expected: String },

    /// The operation needs something this build or machine does not have.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The CUDA driver reported an error.
    #[error("cuda error in {context}: {message}")]
    Cuda { context: &'static str, message: String },

    /// A panic inside the library, caught at the C boundary. It is a bug.
    #[error("internal error (caught panic): {0}")]
    Panic(String),
}

impl Error {
    pub(crate) fn invalid_argument(name: &'static str, reason: impl fmt::Display) -> Self {
        Error::InvalidArgument { name, reason: reason.to_string() }
    }

    pub(crate) fn invalid_layout(tensor: &'static str, reason: impl fmt::Display) -> Self {
        Error::InvalidLayout { tensor, reason: reason.to_string() }
    }

    /// The status code that stands for this error at the C boundary.
    pub fn status(&self) -> Status {
        match self {
            Error::NullPointer(_) => Status::NullPointer,
            Error::InvalidConfig(_) => Status::InvalidConfig,
            Error::InvalidArgument { .. } => Status::InvalidArgument,
            Error::UnsupportedDtype { .. } => Status::UnsupportedDtype,
            Error::ShapeMismatch(_) => Status::ShapeMismatch,
            Error::InvalidLayout { .. } => Status::InvalidLayout,
            Error::LabelOutOfRange { .. } => Status::LabelOutOfRange,
            Error::BufferLength { .. } => Status::BufferLength,
            Error::InvalidState(_) => Status::InvalidState,
            Error::DeviceMismatch { .. } => Status::DeviceMismatch,
            Error::Unsupported(_) => Status::Unsupported,
            Error::Cuda { .. } => Status::CudaError,
            Error::Panic(_) => Status::Panic,
        }
    }
}

/// The status every C function returns. Values are fixed forever; new ones are only appended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// The configuration is invalid (num_classes, ema_decay, min_prevalence, device).
    InvalidConfig = 2,
    /// An option is out of range (reduction code, label smoothing, a flag that is not 0 or 1).
    InvalidArgument = 3,
    /// A tensor's dtype is not accepted (unknown code, bits or lanes).
    UnsupportedDtype = 4,
    /// Shapes do not fit together or do not fit num_classes.
    ShapeMismatch = 5,
    /// Strides, offsets or sizes that cannot be used (overlap, misalignment, overflow).
    InvalidLayout = 6,
    /// A target label outside [0, num_classes) that is not the ignore index.
    LabelOutOfRange = 7,
    /// A caller's buffer length does not match what the call needs.
    BufferLength = 8,
    /// A state blob or count vector that cannot be applied (truncated, corrupted, other C).
    InvalidState = 9,
    /// A tensor is on a device the handle does not compute on.
    DeviceMismatch = 10,
    /// Not available in this build or on this machine (for example CUDA).
    Unsupported = 11,
    /// The CUDA driver reported an error.
    CudaError = 12,
    /// A panic was caught inside the library: a bug, please report it.
    Panic = 13,
}

impl Status {
    /// Every status, in numeric order.
    ///
    /// cbindgen:ignore
    pub const ALL: [Status; 14] = [
        Status::Ok,
        Status::NullPointer,
        Status::InvalidConfig,
        Status::InvalidArgument,
        Status::UnsupportedDtype,
        Status::ShapeMismatch,
        Status::InvalidLayout,
        Status::LabelOutOfRange,
        Status::BufferLength,
        Status::InvalidState,
        Status::DeviceMismatch,
        Status::Unsupported,
        Status::CudaError,
        Status::Panic,
    ];

    /// Reads a status from its integer value, if it is one.
    pub fn from_code(code: i32) -> Option<Status> {
        Status::ALL.iter().copied().find(|status| *status as i32 == code)
    }

    /// A short, static description of the status.
    pub fn description(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NullPointer => "a required pointer is NULL",
            Status::InvalidConfig => "invalid configuration",
            Status::InvalidArgument => "invalid argument",
            Status::UnsupportedDtype => "unsupported dtype",
            Status::ShapeMismatch => "shape mismatch",
            Status::InvalidLayout => "invalid tensor layout",
            Status::LabelOutOfRange => "label out of range",
            Status::BufferLength => "buffer length mismatch",
            Status::InvalidState => "invalid state",
            Status::DeviceMismatch => "device mismatch",
            Status::Unsupported => "unsupported in this build or on this machine",
            Status::CudaError => "cuda error",
            Status::Panic => "internal error (caught panic)",
        }
    }
}
