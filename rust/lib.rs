//! costbound: lock-free budget gates.
//!
//! [`core`] is pure Rust (atomics only) and is what `cargo test` and the loom models check.
//! `py` (feature `python`) is the thin PyO3 layer that maturin builds into `costbound._native`.

pub mod core;

#[cfg(feature = "python")]
mod py;
