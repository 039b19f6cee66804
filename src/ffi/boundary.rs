//! The panic boundary every exported function runs inside, and the thread-local message of the
//! last error.
//!
//! [`status`] runs a fallible body, catches any panic, and turns the outcome into a [`Status`]
//! while recording the error's message for `cbce_last_error_message`. [`value`] does the same
//! for the few functions that return a value instead of a status.

use crate::error::{Error, Result, Status};
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Runs `body`; a panic becomes [`Status::Panic`]. The last error message is set to the
/// error's on failure and emptied on success.
pub(crate) fn status(body: impl FnOnce() -> Result<()>) -> Status {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string());
        Err(Error::Panic(text))
    });
    match outcome {
        Ok(()) => {
            set_last_error("");
            Status::Ok
        }
        Err(error) => {
            set_last_error(&error.to_string());
            error.status()
        }
    }
}

/// Runs an infallible `body`; a panic (a bug) yields `fallback` instead of unwinding into C.
pub(crate) fn value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

fn set_last_error(message: &str) {
    // Interior NUL bytes cannot appear in a C string; they are dropped.
    let text = CString::new(message.replace('\0', "")).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = text);
}

/// The last error message of this thread, valid until the thread's next call into the library.
pub(crate) fn last_error() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn message() -> String {
        // SAFETY: last_error returns this thread's live, NUL-terminated message.
        unsafe { CStr::from_ptr(last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_with_its_message() {
        let status = status(|| panic!("boom at {}", 3));
        assert_eq!(status, Status::Panic);
        assert!(message().contains("boom at 3"), "{}", message());
    }

    #[test]
    fn success_clears_the_message() {
        let _ = status(|| Err(Error::NullPointer("x")));
        assert!(message().contains("`x`"));
        assert_eq!(status(|| Ok(())), Status::Ok);
        assert_eq!(message(), "");
    }
}
