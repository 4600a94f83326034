//! The guard every raw C entry point of the binding runs its body in.
//!
//! PyO3 wraps the methods it generates in a trampoline that catches panics; the entry points
//! this crate installs by hand (the `METH_FASTCALL` methods of [`super::fastcall`], the
//! `am_await` / `am_send` / `tp_iternext` slots of [`super::awaitable`]) owe the interpreter
//! the same guarantee. A panic that unwinds into C cannot be caught there and aborts the
//! process, so each entry runs its body in [`catch_panic`], which turns a panic into a Python
//! exception that the entry then raises as usual. On the path that does not panic the guard
//! costs nothing (no call, no allocation, no atomic).

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use pyo3::PyResult;
use pyo3::panic::PanicException;
use pyo3::prelude::*;

/// Runs `body`; a panic becomes `PanicException` (what PyO3's own wrappers raise) carrying the
/// panic's message.
///
/// Always inlined: left to the optimiser, `try_reserve_sync` timed some 4 ns a call slower with
/// the guard than without it (side by side, one machine); inlined, the difference was noise.
#[allow(clippy::inline_always)]
#[inline(always)]
pub(crate) fn catch_panic<T>(body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| Err(panic_error(&*payload)))
}

#[cold]
#[inline(never)]
fn panic_error(payload: &(dyn Any + Send)) -> PyErr {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic in costbound".to_owned());
    PanicException::new_err(message)
}
