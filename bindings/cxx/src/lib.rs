//! relora for C++ hosts whose build runs Cargo (Bazel with rules_rust, Buck, CMake with
//! Corrosion, a Rust-driven build): a [`cxx`] bridge with checked types on both sides, slices
//! and strings instead of pointer-and-length pairs, errors as C++ exceptions (`rust::Error`),
//! and the host's communicator as a C++ object that relora calls for the gradient all-reduce.
//!
//! It is a second face of the same core as the C ABI, not a second implementation: a trainer
//! here is the C ABI's [`Session`], options go through the same options table, and every call
//! fails with the same message the C function of the same name gives (`relora_trainer_step:
//! token id 300 at row 0, column 7 is outside [0, vocab_size 258)`). Unlike the C ABI this
//! interface is not stable across versions: the C++ side is generated for the exact crate it
//! is built with.
//!
//! A trainer is used by one thread at a time (C++ holds it as `rust::Box<Trainer>`); separate
//! trainers may run in parallel. A panic inside relora is caught at the bridge, reported as an
//! exception, and poisons that trainer (every later call on it throws).

use relora::ffi::guard::Failure;
use relora::ffi::options::Options;
use relora::ffi::session::{FaceReducer, Session};
use relora::ffi::stats::relora_step_stats;
use relora::trainer::GradientReducer;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;

#[cxx::bridge(namespace = "relora::bridge")]
mod bridge {
    /// One option, as `relora_params_set` takes it: a key and its value as text.
    struct KeyValue {
        key: String,
        value: String,
    }

    /// What one optimizer step did (the fields of the C API's `relora_step_stats`).
    #[derive(Debug)]
    struct StepStats {
        /// Optimizer steps completed after this one (skipped steps don't count).
        step: u64,
        /// Mean loss over the step's micro-batches, as computed.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Completed ReLoRA merges so far.
        phase: u32,
        /// Tokens processed by this step.
        tokens: u64,
        /// Whether this step was skipped for a non-finite loss or gradient.
        skipped: bool,
        /// Steps skipped in the whole run.
        skipped_total: u64,
        /// Whether adapters are attached.
        adapters: bool,
        /// Whether a merge and optimizer reset happened right before this step.
        merged: bool,
        /// Whether the model switched to adapters right before this step.
        switched: bool,
    }

    extern "Rust" {
        /// A trainer: create with `new_trainer` or `load_trainer`.
        type Trainer;

        /// A trainer with a freshly initialised model, from options by key (`preset` first if
        /// given, as in the C API).
        fn new_trainer(options: &[KeyValue]) -> Result<Box<Trainer>>;
        /// A trainer resumed from a checkpoint directory, on `device` ("" means "cpu").
        fn load_trainer(dir: &str, device: &str) -> Result<Box<Trainer>>;
        /// The library version, e.g. "0.1.0".
        fn version() -> String;

        /// One optimizer step on `batch` rows of `len` tokens (len = seq_len + 1).
        fn step(self: &mut Trainer, tokens: &[i32], batch: usize, len: usize) -> Result<StepStats>;
        /// Forward and backward of one micro-batch, added to the step being built; returns its
        /// mean loss.
        fn accumulate(self: &mut Trainer, tokens: &[i32], batch: usize, len: usize) -> Result<f64>;
        /// Finishes a split step without reducing the gradients.
        fn apply(self: &mut Trainer) -> Result<StepStats>;
        /// Finishes a split step with the gradients averaged over `comm`'s ranks.
        fn apply_with(self: &mut Trainer, comm: Pin<&mut Communicator>) -> Result<StepStats>;
        /// Mean loss (nats) on `batch` rows of `len` tokens, without changing the trainer.
        fn eval(self: &Trainer, tokens: &[i32], batch: usize, len: usize) -> Result<f64>;
        /// Saves a checkpoint to `dir`, with the host's JSON state ("" for none), kept byte for
        /// byte.
        fn save(self: &Trainer, dir: &str, host_state: &str) -> Result<()>;
        /// The host state of the checkpoint this trainer was loaded from ("" when none).
        fn host_state(self: &Trainer) -> Result<String>;
        /// Merges the current adapters now.
        fn merge(self: &mut Trainer) -> Result<()>;
        /// Exports the merged model as a Hugging Face directory (`dtype` "" means f32).
        fn export_hf(
            self: &Trainer,
            out_dir: &str,
            dtype: &str,
            max_shard_bytes: u64,
            overwrite: bool,
        ) -> Result<()>;
        /// Optimizer steps completed.
        fn step_count(self: &Trainer) -> Result<u64>;
        /// Completed ReLoRA merges.
        fn phase(self: &Trainer) -> Result<u64>;
        /// An option's value as text.
        fn config_get(self: &Trainer, key: &str) -> Result<String>;
        /// The names of the model's parameters now.
        fn tensor_names(self: &Trainer) -> Result<Vec<String>>;
        /// The number of elements of parameter `name`.
        fn tensor_numel(self: &Trainer, name: &str) -> Result<usize>;
        /// Copies parameter `name` as f32 into `out` (exactly its elements).
        fn tensor_get(self: &Trainer, name: &str, out: &mut [f32]) -> Result<()>;
        /// Overwrites parameter `name` with `values` (f32, finite, exactly its elements).
        fn tensor_set(self: &mut Trainer, name: &str, values: &[f32]) -> Result<()>;
    }

    unsafe extern "C++" {
        include!("relora_cxx/communicator.h");

        /// The host's communicator (see `include/relora_cxx/communicator.h`).
        type Communicator;

        /// Sums `values` over all ranks, in place; an exception fails the step.
        fn all_reduce_sum(self: Pin<&mut Communicator>, values: &mut [f32]) -> Result<()>;
        /// How many ranks take part.
        fn world_size(self: &Communicator) -> usize;
    }
}

pub use bridge::{Communicator, KeyValue, StepStats};

/// A trainer behind the bridge: a session, and the message of the panic that poisoned it.
pub struct Trainer {
    session: Session,
    poison: Option<String>,
}

/// A failure as the C API reports it: `func: message`.
fn message(func: &str, f: Failure) -> String {
    format!("{func}: {}", f.message)
}

/// Runs `body` for the C function `func`: failures become its message, a panic becomes an
/// error too, never an unwind across the bridge.
fn guarded<T>(func: &str, body: impl FnOnce() -> Result<T, Failure>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r.map_err(|f| message(func, f)),
        Err(payload) => Err(format!("{func}: internal panic: {}", panic_text(&*payload))),
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn stats(c: relora_step_stats) -> StepStats {
    StepStats {
        step: c.step,
        loss: c.loss,
        lr: c.lr,
        grad_norm: c.grad_norm,
        phase: c.phase,
        tokens: c.tokens,
        skipped: c.skipped,
        skipped_total: c.skipped_total,
        adapters: c.adapters,
        merged: c.merged,
        switched: c.switched,
    }
}

fn new_trainer(options: &[KeyValue]) -> Result<Box<Trainer>, String> {
    guarded("relora_trainer_new", || {
        let mut o = Options::new()?;
        // `preset` and `model_config` replace every model key: set first, as the C API's
        // file loader does, so the order of the list does not matter for them.
        let first = |k: &str| k == "preset" || k == "model_config";
        for kv in options.iter().filter(|kv| first(&kv.key)) {
            o.set(&kv.key, &kv.value)?;
        }
        for kv in options.iter().filter(|kv| !first(&kv.key)) {
            o.set(&kv.key, &kv.value)?;
        }
        Ok(Box::new(Trainer {
            session: Session::create(o)?,
            poison: None,
        }))
    })
}

fn load_trainer(dir: &str, device: &str) -> Result<Box<Trainer>, String> {
    guarded("relora_trainer_load", || {
        let device = Some(device).filter(|d| !d.is_empty());
        Ok(Box::new(Trainer {
            session: Session::load(dir, device)?,
            poison: None,
        }))
    })
}

fn version() -> String {
    use relora::ffi::version::{RELORA_VERSION_MAJOR, RELORA_VERSION_MINOR, RELORA_VERSION_PATCH};
    format!("{RELORA_VERSION_MAJOR}.{RELORA_VERSION_MINOR}.{RELORA_VERSION_PATCH}")
}

/// The host's communicator as the trainer's gradient reducer: every gradient summed over the
/// ranks, then divided by their number. The first exception stops the step.
struct HostCommunicator<'a> {
    comm: Pin<&'a mut Communicator>,
    failed: Option<String>,
}

impl GradientReducer for HostCommunicator<'_> {
    fn reduce(&mut self, name: &str, grad: &mut [f32]) -> relora::Result<()> {
        if let Err(e) = self.comm.as_mut().all_reduce_sum(grad) {
            let what = format!(
                "the communicator's all_reduce_sum threw for {name} ({}); the step was \
                 abandoned and its gradients discarded",
                e.what()
            );
            self.failed = Some(what.clone());
            return Err(relora::Error::Distributed(what));
        }
        let world = self.comm.world_size().max(1) as f32;
        for g in grad.iter_mut() {
            *g /= world;
        }
        Ok(())
    }
}

impl FaceReducer for HostCommunicator<'_> {
    fn reducer(&mut self) -> &mut dyn GradientReducer {
        self
    }

    fn failure(&self) -> Option<String> {
        self.failed.clone()
    }
}

impl Trainer {
    /// Runs `body` on the session for the C function `func`: a poisoned trainer refuses, a panic
    /// poisons it.
    fn with<T>(
        &mut self,
        func: &str,
        body: impl FnOnce(&mut Session) -> Result<T, Failure>,
    ) -> Result<T, String> {
        if let Some(p) = &self.poison {
            return Err(format!(
                "{func}: the trainer panicked in an earlier call ({p}); it must be dropped"
            ));
        }
        let session = &mut self.session;
        match catch_unwind(AssertUnwindSafe(|| body(session))) {
            Ok(r) => r.map_err(|f| message(func, f)),
            Err(payload) => {
                let text = panic_text(&*payload);
                self.poison = Some(text.clone());
                Err(format!(
                    "{func}: internal panic: {text}; the trainer is poisoned and must be dropped"
                ))
            }
        }
    }

    /// [`Trainer::with`] for calls that do not change the trainer.
    fn read<T>(
        &self,
        func: &str,
        body: impl FnOnce(&Session) -> Result<T, Failure>,
    ) -> Result<T, String> {
        if let Some(p) = &self.poison {
            return Err(format!(
                "{func}: the trainer panicked in an earlier call ({p}); it must be dropped"
            ));
        }
        guarded(func, || body(&self.session))
    }

    fn step(&mut self, tokens: &[i32], batch: usize, len: usize) -> Result<StepStats, String> {
        self.with("relora_trainer_step", |s| s.step(tokens, batch, len))
            .map(stats)
    }

    fn accumulate(&mut self, tokens: &[i32], batch: usize, len: usize) -> Result<f64, String> {
        self.with("relora_trainer_accumulate", |s| {
            s.accumulate(tokens, batch, len)
        })
    }

    fn apply(&mut self) -> Result<StepStats, String> {
        self.with("relora_trainer_apply", |s| s.apply(None))
            .map(stats)
    }

    fn apply_with(&mut self, comm: Pin<&mut Communicator>) -> Result<StepStats, String> {
        self.with("relora_trainer_apply", |s| {
            let mut reducer = HostCommunicator { comm, failed: None };
            s.apply(Some(&mut reducer))
        })
        .map(stats)
    }

    fn eval(&self, tokens: &[i32], batch: usize, len: usize) -> Result<f64, String> {
        self.read("relora_trainer_eval", |s| s.eval(tokens, batch, len))
    }

    fn save(&self, dir: &str, host_state: &str) -> Result<(), String> {
        let host = Some(host_state).filter(|h| !h.is_empty());
        self.read("relora_trainer_save", |s| s.save(dir, host))
    }

    fn host_state(&self) -> Result<String, String> {
        self.read("relora_trainer_host_state", |s| {
            Ok(s.host_state().to_string())
        })
    }

    fn merge(&mut self) -> Result<(), String> {
        self.with("relora_trainer_merge", |s| s.merge())
    }

    fn export_hf(
        &self,
        out_dir: &str,
        dtype: &str,
        max_shard_bytes: u64,
        overwrite: bool,
    ) -> Result<(), String> {
        let dtype = Some(dtype).filter(|d| !d.is_empty());
        self.read("relora_trainer_export", |s| {
            s.export(out_dir, dtype, max_shard_bytes, overwrite)
        })
    }

    fn step_count(&self) -> Result<u64, String> {
        self.read("relora_trainer_step_count", |s| {
            Ok(s.trainer().step_count())
        })
    }

    fn phase(&self) -> Result<u64, String> {
        self.read("relora_trainer_phase", |s| {
            Ok(s.trainer().phases().len() as u64)
        })
    }

    fn config_get(&self, key: &str) -> Result<String, String> {
        self.read("relora_trainer_config_get", |s| s.options().get(key))
    }

    fn tensor_names(&self) -> Result<Vec<String>, String> {
        self.read("relora_trainer_tensor_name", |s| Ok(s.tensor_names()))
    }

    fn tensor_numel(&self, name: &str) -> Result<usize, String> {
        self.read("relora_trainer_tensor_numel", |s| {
            Ok(s.tensor_shape(name)?.iter().product())
        })
    }

    fn tensor_get(&self, name: &str, out: &mut [f32]) -> Result<(), String> {
        self.read("relora_trainer_tensor_get", |s| s.tensor_get(name, out))
    }

    fn tensor_set(&mut self, name: &str, values: &[f32]) -> Result<(), String> {
        self.with("relora_trainer_tensor_set", |s| s.tensor_set(name, values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Box<Trainer> {
        let kv = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: v.into(),
        };
        new_trainer(&[
            kv("vocab_size", "64"),
            kv("seq_len", "8"),
            kv("batch_size", "2"),
            kv("preset", "tiny"),
        ])
        .unwrap()
    }

    #[test]
    fn a_panic_is_an_error_and_poisons_the_trainer() {
        let mut t = tiny();
        let err = t
            .with("relora_trainer_step", |_| -> Result<(), Failure> {
                panic!("injected fault")
            })
            .unwrap_err();
        assert!(
            err.starts_with("relora_trainer_step: internal panic: injected fault"),
            "{err}"
        );
        let err = t.step_count().unwrap_err();
        assert!(err.contains("panicked in an earlier call"), "{err}");
    }

    #[test]
    fn preset_applies_first_wherever_it_is_listed() {
        // `preset` came last above, after the model keys it would otherwise reset.
        let t = tiny();
        assert_eq!(t.config_get("vocab_size").unwrap(), "64");
        assert_eq!(t.config_get("hidden_size").unwrap(), "64");
        // SAFETY: a static NUL-terminated string.
        let c = unsafe { std::ffi::CStr::from_ptr(relora::ffi::version::relora_version()) };
        assert_eq!(version(), c.to_str().unwrap());
    }
}
