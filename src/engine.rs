//! Engine choices: how a trainer computes, never what it trains. Each is an option of the
//! trainer that carries it ([`crate::config::TrainConfig`]'s `fused_kernels`, `layer_nodes`,
//! ... keys: `--set` on the command line, `relora_params_set_bool` in the C API, switches of
//! `relora bench`), so two trainers in one process may differ. Every default is the path the
//! measurements chose; each switch stays until the measurement named on it retires it.
//!
//! The ops far below the trainer read the choices of the trainer that is calling them: a
//! trainer runs each of its calls inside [`scoped`], which sets them for the calling thread for
//! the duration of the call and restores what was there before. Code that runs the model outside
//! a trainer call (sampling, tests) gets [`Engine::default`].

use serde::{Deserialize, Serialize};
use std::cell::Cell;

/// The engine choices of one trainer. All on by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Engine {
    /// The fused ops (hand-written kernels with their own backward) instead of candle's
    /// composed operations. Off is the reference the fused ops are tested against, and a way
    /// round a kernel suspected of a fault (`relora bench --composed-ops`). Retired when every
    /// fused op has its own test against the composed one on each device, which the CPU has and
    /// the GPU has only in the emulator: a GPU run of `tests/cuda.rs` retires it.
    pub fused_kernels: bool,
    /// Each decoder layer as one autograd node with a hand-chained backward, instead of
    /// candle's graph (`relora bench --graph-layers`). Measured on the CPU (60m full rank
    /// +30 %); retired by the H100 run that measures the bf16 layer nodes.
    pub layer_nodes: bool,
    /// Adapted projections over enough rows read `W + s B A` once (`relora bench
    /// --separate-adapter-products`). Measured on the CPU (+1 %); retired by the GPU on/off
    /// ratio of `scripts/gpu-check.sh`.
    pub effective_weights: bool,
    /// bf16 products that the model keeps in f32 accumulate and stay in f32 (`relora bench
    /// --rounded-products`). Retired by the GPU on/off ratio of `scripts/gpu-check.sh`.
    pub widening_products: bool,
    /// AdamW and the gradient norm as grouped CUDA launches (`relora bench
    /// --per-tensor-optimizer`); no effect on the CPU. Retired by the GPU on/off ratio of
    /// `scripts/gpu-check.sh`.
    pub grouped_updates: bool,
}

impl Default for Engine {
    fn default() -> Self {
        Engine {
            fused_kernels: true,
            layer_nodes: true,
            effective_weights: true,
            widening_products: true,
            grouped_updates: true,
        }
    }
}

impl Engine {
    /// The option keys, as [`crate::config::TrainConfig::set`] takes them.
    pub const KEYS: [&'static str; 5] = [
        "fused_kernels",
        "layer_nodes",
        "effective_weights",
        "widening_products",
        "grouped_updates",
    ];

    /// The switch named `key`, if it is one.
    pub(crate) fn switch_mut(&mut self, key: &str) -> Option<&mut bool> {
        match key {
            "fused_kernels" => Some(&mut self.fused_kernels),
            "layer_nodes" => Some(&mut self.layer_nodes),
            "effective_weights" => Some(&mut self.effective_weights),
            "widening_products" => Some(&mut self.widening_products),
            "grouped_updates" => Some(&mut self.grouped_updates),
            _ => None,
        }
    }
}

thread_local! {
    static CURRENT: Cell<Engine> = Cell::new(Engine::default());
}

/// The choices of the trainer calling on this thread (the defaults outside a trainer call).
pub fn current() -> Engine {
    CURRENT.with(Cell::get)
}

/// Puts the previous choices back when a scope ends, however it ends.
struct Restore(Engine);

impl Drop for Restore {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Runs `f` with `engine`'s choices on this thread, then restores the previous ones (also when
/// `f` panics). Scopes nest.
pub fn scoped<T>(engine: Engine, f: impl FnOnce() -> T) -> T {
    let _restore = Restore(CURRENT.with(|c| c.replace(engine)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_hold_for_their_scope_and_thread_only() {
        let off = Engine {
            fused_kernels: false,
            ..Engine::default()
        };
        assert!(current().fused_kernels);
        scoped(off, || {
            assert!(!current().fused_kernels);
            // Another thread (another trainer) is not affected.
            std::thread::spawn(|| assert!(current().fused_kernels))
                .join()
                .unwrap();
            scoped(Engine::default(), || assert!(current().fused_kernels));
            assert!(!current().fused_kernels);
        });
        assert!(current().fused_kernels);
        let panicked = std::panic::catch_unwind(|| scoped(off, || panic!("inside")));
        assert!(panicked.is_err());
        assert!(
            current().fused_kernels,
            "a panic left the scope's choices behind"
        );
    }

    #[test]
    fn every_key_names_a_switch() {
        let mut e = Engine::default();
        for key in Engine::KEYS {
            *e.switch_mut(key).unwrap() = false;
        }
        let all_off = Engine {
            fused_kernels: false,
            layer_nodes: false,
            effective_weights: false,
            widening_products: false,
            grouped_updates: false,
        };
        assert_eq!(e, all_off);
        assert!(e.switch_mut("turbo").is_none());
    }
}
