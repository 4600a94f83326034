//! What a permit and a token request share: their states, the single entry of a `with`
//! block, and the start of an `await` (the fast path, or the hand-over to
//! `costbound._waiting.wait`).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::blocking::timed_out;
use crate::py::coroutine::FastAwait;

/// Not awaited yet, or its wait ended without a grant: an `await` starts a wait.
pub(super) const PENDING: u8 = 0;
/// Being awaited: a second `await` meanwhile is refused.
pub(super) const WAITING: u8 = 1;
/// Granted: an `await` returns at once.
pub(super) const GRANTED: u8 = 2;
/// Used up: released (a permit) or exited (a token request); never awaited or entered again.
pub(super) const RELEASED: u8 = 3;

/// `costbound._waiting.wait`, registered at import.
static WAIT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Registers the coroutine function that suspended waits run: `wait(owner, timeout)`.
#[pyfunction]
pub(crate) fn register_wait(wait: &Bound<'_, PyAny>) {
    let _ = WAIT.set(wait.py(), wait.clone().unbind());
}

/// `RuntimeError` for a permit or token request awaited or entered after it was used up.
pub(super) fn used_up(what: &str, call: &str) -> PyErr {
    PyRuntimeError::new_err(format!(
        "this {what} was already used: a {what} is single-use (entered once, never again \
         after its exit); call {call}() for a new one"
    ))
}

/// `RuntimeError` for a request awaited (or entered) while its wait is in progress.
fn being_awaited() -> PyErr {
    PyRuntimeError::new_err("this request is already being awaited")
}

/// Takes the single entry of a `with` / `async with` block. A request whose wait is in
/// progress (awaited by its owner's task) is refused without taking the entry, which stays
/// its owner's.
pub(super) fn enter_once(
    state: &AtomicU8,
    entered: &AtomicBool,
    what: &str,
    call: &str,
) -> PyResult<()> {
    match state.load(Ordering::Acquire) {
        RELEASED => return Err(used_up(what, call)),
        WAITING => return Err(being_awaited()),
        _ => {}
    }
    if entered.swap(true, Ordering::AcqRel) {
        return Err(used_up(what, call));
    }
    Ok(())
}

/// A wait that ended without a grant: the request may be awaited (and entered) again.
pub(super) fn reset(state: &AtomicU8, entered: &AtomicBool) {
    if state
        .compare_exchange(WAITING, PENDING, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        entered.store(false, Ordering::Release);
    }
}

/// Starts the `await` of a permit or token request: the fast path, or the suspended wait in
/// `costbound._waiting`, whose iterator is returned.
pub(super) fn enter_wait<'py, T: FastAwait>(
    slf: Borrowed<'_, 'py, T>,
    state: &AtomicU8,
    entered: &AtomicBool,
    timeout: Option<f64>,
    used: impl FnOnce() -> PyErr,
    try_now: impl FnOnce() -> PyResult<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = slf.py();
    match state.compare_exchange(PENDING, WAITING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(WAITING) => return Err(being_awaited()),
        Err(GRANTED) => return Ok(slf.to_owned().into_any()), // await returns at once
        Err(_) => return Err(used()),
    }
    match try_now() {
        Ok(true) => {
            state.store(GRANTED, Ordering::Release);
            return Ok(slf.to_owned().into_any());
        }
        Ok(false) => {}
        Err(err) => {
            reset(state, entered);
            return Err(err);
        }
    }
    if timeout == Some(0.0) {
        reset(state, entered);
        return Err(timed_out(0.0));
    }
    // `Bound`s only: this runs under a raw slot (see `awaitable`).
    let suspended = WAIT
        .get(py)
        .ok_or_else(|| PyRuntimeError::new_err("costbound._waiting was not imported"))
        .and_then(|wait| wait.bind(py).call1((slf.to_owned(), timeout)))
        .and_then(|coroutine| coroutine.call_method0(pyo3::intern!(py, "__await__")));
    if suspended.is_err() {
        reset(state, entered);
    }
    suspended
}
