//! Where the thread-local last-error message lives: set by the panic boundary when a call fails,
//! cleared when one succeeds, read by `relora_last_error_message` ([`super::error`]).

use std::cell::RefCell;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records `message` as this thread's last error.
pub(crate) fn set_last_error(message: String) {
    LAST_ERROR.with(|m| *m.borrow_mut() = message);
}

/// Clears this thread's last error (after a successful call).
pub(crate) fn clear_last_error() {
    LAST_ERROR.with(|m| m.borrow_mut().clear());
}

/// A copy of this thread's last error.
pub(crate) fn last_error() -> String {
    LAST_ERROR.with(|m| m.borrow().clone())
}
