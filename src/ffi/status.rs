//! Status codes. Values are grouped by hundreds and never reused: a retired value stays here as a
//! comment so no later status takes its number.

use crate::error::Error;

/// The result of every fallible call. `RELORA_STATUS_OK` (0) is success; anything else is a
/// failure whose detail is in `relora_last_error_message`.
///
/// Groups: 1xx a bad argument from the caller, 2xx invalid configuration or data, 3xx the
/// object's state does not allow the call, 4xx files, 5xx the runtime (device, computation,
/// internal errors).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum relora_status {
    /// Success.
    Ok = 0,

    /// A required pointer argument was NULL.
    NullParameter = 100,
    /// An argument is out of range or inconsistent with another (a zero length, a length that
    /// does not match, text that is not UTF-8, ...).
    InvalidArgument = 101,
    /// The output buffer is too small; nothing was written. Pass a NULL buffer and length 0 to
    /// learn the size needed.
    BufferTooSmall = 102,
    /// A handle argument is not a live handle of the expected kind (already freed, never created
    /// by this library, or a handle of another kind).
    InvalidHandle = 103,
    /// A parameter key is not known to this version of the library.
    UnknownParam = 104,
    /// A parameter value cannot be parsed, or a typed setter does not match the key's type.
    InvalidParam = 105,
    /// A tensor name is not a parameter of the model.
    UnknownTensor = 106,

    /// The configuration is invalid or inconsistent (e.g. `warmup_steps` >= `steps`).
    InvalidConfig = 200,
    /// The training data is unusable (token ids >= vocab_size, negative ids, sequence longer
    /// than the model allows, ...).
    InvalidData = 201,
    /// A tokenizer could not be created.
    Tokenizer = 202,
    /// A tensor has the wrong shape.
    ShapeMismatch = 203,

    /// The object's state does not allow this call now (apply without accumulate, merge without
    /// adapters, save during an accumulation, ...).
    InvalidState = 300,
    /// The trainer panicked in an earlier call and refuses everything except `_free`.
    Poisoned = 301,
    /// The trainer is already inside another call (from another thread, or from one of its own
    /// callbacks).
    Busy = 302,
    /// A progress callback returned false; the operation was abandoned and no update applied.
    Aborted = 303,
    /// A host callback reported failure (the gradient reducer returned false).
    CallbackFailed = 304,
    /// Too many consecutive steps produced a non-finite loss or gradient.
    NonFinite = 305,

    /// Reading or writing a file or directory failed.
    Io = 400,
    /// A checkpoint is missing, corrupt, truncated or inconsistent, or one of its files is not
    /// a regular file.
    Checkpoint = 401,
    /// The output path holds something relora may not replace: a file or directory relora did
    /// not write (never replaced), or relora's own earlier output when replacing it was not
    /// asked for. Nothing was changed; the message names the path and what is there.
    OutputExists = 402,

    /// The requested device is not available in this build or on this machine.
    Device = 500,
    /// A tensor computation failed.
    Compute = 501,
    /// The library panicked (a bug); the detail is in the message.
    Panic = 502,
}

impl relora_status {
    /// Every status, for the string table and tests.
    pub(crate) const ALL: [relora_status; 24] = [
        relora_status::Ok,
        relora_status::NullParameter,
        relora_status::InvalidArgument,
        relora_status::BufferTooSmall,
        relora_status::InvalidHandle,
        relora_status::UnknownParam,
        relora_status::InvalidParam,
        relora_status::UnknownTensor,
        relora_status::InvalidConfig,
        relora_status::InvalidData,
        relora_status::Tokenizer,
        relora_status::ShapeMismatch,
        relora_status::InvalidState,
        relora_status::Poisoned,
        relora_status::Busy,
        relora_status::Aborted,
        relora_status::CallbackFailed,
        relora_status::NonFinite,
        relora_status::Io,
        relora_status::Checkpoint,
        relora_status::OutputExists,
        relora_status::Device,
        relora_status::Compute,
        relora_status::Panic,
    ];

    /// A fixed, NUL-terminated description of the status.
    pub fn description(self) -> &'static str {
        match self {
            relora_status::Ok => "success\0",
            relora_status::NullParameter => "a required pointer argument was NULL\0",
            relora_status::InvalidArgument => "invalid argument\0",
            relora_status::BufferTooSmall => "output buffer too small\0",
            relora_status::InvalidHandle => "not a live handle of the expected kind\0",
            relora_status::UnknownParam => "unknown parameter key\0",
            relora_status::InvalidParam => "invalid parameter value\0",
            relora_status::UnknownTensor => "unknown tensor name\0",
            relora_status::InvalidConfig => "invalid configuration\0",
            relora_status::InvalidData => "invalid training data\0",
            relora_status::Tokenizer => "tokenizer error\0",
            relora_status::ShapeMismatch => "tensor shape mismatch\0",
            relora_status::InvalidState => "call not allowed in the current state\0",
            relora_status::Poisoned => "trainer poisoned by an earlier panic\0",
            relora_status::Busy => "trainer busy in another call\0",
            relora_status::Aborted => "aborted by the progress callback\0",
            relora_status::CallbackFailed => "a host callback reported failure\0",
            relora_status::NonFinite => "too many consecutive non-finite steps\0",
            relora_status::Io => "file or directory I/O error\0",
            relora_status::Checkpoint => "invalid checkpoint\0",
            relora_status::OutputExists => {
                "the output path holds something relora may not replace\0"
            }
            relora_status::Device => "device unavailable\0",
            relora_status::Compute => "tensor computation failed\0",
            relora_status::Panic => "internal panic\0",
        }
    }

    /// The status with numeric value `code`, if there is one.
    pub fn from_code(code: i32) -> Option<relora_status> {
        Self::ALL.iter().copied().find(|s| *s as i32 == code)
    }
}

/// The status group a core error belongs to.
pub fn status_of(e: &Error) -> relora_status {
    match e {
        Error::Tensor { .. } => relora_status::Compute,
        Error::Io { .. } => relora_status::Io,
        Error::Config(_) => relora_status::InvalidConfig,
        Error::Data(_) => relora_status::InvalidData,
        Error::Tokenizer(_) => relora_status::Tokenizer,
        Error::Checkpoint { .. } => relora_status::Checkpoint,
        Error::OutputExists { .. } => relora_status::OutputExists,
        Error::Shape { .. } => relora_status::ShapeMismatch,
        Error::NonFinite { .. } => relora_status::NonFinite,
        Error::Device(_) => relora_status::Device,
        // The C API has no built-in communicator (hosts reduce through the callback), so this
        // only reaches a host through a core call that failed inside a collective.
        Error::Distributed(_) => relora_status::CallbackFailed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_grouped_and_described() {
        let mut seen = HashSet::new();
        for s in relora_status::ALL.iter() {
            assert!(seen.insert(*s as i32), "{s:?} reuses a value");
            let code = *s as i32;
            assert!(code == 0 || (100..600).contains(&code));
            assert!(s.description().ends_with('\0'));
            assert_eq!(relora_status::from_code(code), Some(*s));
        }
        assert_eq!(relora_status::from_code(7), None);
    }

    #[test]
    fn core_errors_map_to_their_group() {
        assert_eq!(
            status_of(&Error::Data("x".into())),
            relora_status::InvalidData
        );
        assert_eq!(
            status_of(&Error::Device("cuda:0".into())),
            relora_status::Device
        );
        assert_eq!(
            status_of(&Error::checkpoint("/x", "bad")),
            relora_status::Checkpoint
        );
    }
}
