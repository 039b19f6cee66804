//! The C ABI: an opaque handle, functions that return a status, and the DLPack-compatible
//! tensor descriptor. The header `include/cbce.h` is generated from this module.
//!
//! Conventions, the same for every function:
//! - The return value is a `CbceStatus`; `CBCE_STATUS_OK` (0) is success. On failure
//!   `cbce_last_error_message()` tells what was wrong, naming the data.
//! - Every pointer is checked for NULL; those documented as optional may be NULL.
//! - Outputs are written only on success, and a call that fails leaves the handle's state
//!   exactly as it was.
//! - The library borrows what pointers point to for the duration of the call and keeps
//!   nothing; the caller owns all memory except handles, which `cbce_free` releases.
//! - A handle may be used from several threads at once; each update is atomic.
//! - No call lets a panic unwind into C: it becomes `CBCE_STATUS_PANIC`.

mod api;
mod boundary;
pub(crate) mod ptr;
mod types;

pub use api::*;
pub use types::*;
