//! The stable C ABI (`include/relora.h`, generated from this module by cbindgen).
//!
//! Nothing else in the crate depends on this module; it only drives the core through its public
//! API. Conventions, one place each:
//!
//! - names: `relora_<object>_<verb>`; handles are opaque (`relora_params`, `relora_trainer`);
//! - [`status`]: every fallible call returns a [`status::relora_status`]; values are grouped and
//!   never reused; the detail goes into a thread-local message ([`error`], [`last_error`]);
//! - [`guard`]: the panic boundary around every entry point, pointer and string checks, the
//!   registry of live handles that turns a freed or foreign pointer into an error instead of a
//!   crash, and the poisoning of a trainer that panicked;
//! - outputs are written only on success; `_free(NULL)` is a no-op;
//! - [`params`]: the options handle with its text and typed setters, over the options table
//!   ([`options`]);
//! - [`trainer`]: create, load, save, merge, export, read counters and options; [`train_step`]:
//!   step (one call or split) and eval; [`handle`]: the handle behind them, around a
//!   [`session`], the operations every face of the library shares (the cxx bridge too);
//! - [`tensors`]: copying named parameters out and in as f32;
//! - [`callbacks`]: logging, progress with abort, gradient reduction, each with `user_data`;
//! - [`stats`]: the sized step-statistics struct; [`version`]: version numbers.
//!
//! Thread safety: one trainer is used by one thread at a time (the library detects overlapping
//! calls and answers `RELORA_STATUS_BUSY`); separate trainers may run in parallel. A params handle
//! may be read from several threads at once but not written while it is read.

// The C names (`relora_status`, `relora_trainer`, ...) are the ABI.
#![allow(non_camel_case_types)]
// Every entry point's safety contract is the C contract in its doc comment (each pointer NULL or
// valid for what the doc states); a Rust-style `# Safety` heading would only repeat it in the
// generated header.
#![allow(clippy::missing_safety_doc)]

// Declared in the order the header presents them (cbindgen follows declaration order).
pub mod version;

pub mod status;

mod last_error;

pub mod error;

pub mod guard;

pub mod options;

pub mod params;

pub mod stats;

pub mod callbacks;

pub mod session;

pub mod handle;

pub mod trainer;

pub mod train_step;

pub mod tensors;
