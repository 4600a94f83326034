//! Waits on a thread (`reserve_blocking`, `reserve_tokens_blocking`), with the GIL released.

use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::core::{WaitError, Waitable, wait_blocking};

/// `asyncio.events._get_running_loop`.
static RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `RuntimeError` if this thread is running an event loop, which a blocking wait would freeze.
pub(super) fn refuse_on_a_loop(py: Python<'_>, call: &str) -> PyResult<()> {
    let running = RUNNING_LOOP.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("asyncio.events")?
                .getattr("_get_running_loop")?
                .unbind(),
        )
    })?;
    // A `Bound`, not a `Py`: this runs inside a raw fastcall entry, where PyO3 does not count
    // the thread as attached, and a dropped `Py` would take its deferred (locked) pool.
    if running.bind(py).call0()?.is_none() {
        return Ok(());
    }
    Err(PyRuntimeError::new_err(format!(
        "{call}() was called on a thread that is running an event loop, which it would block; \
         await the async variant instead"
    )))
}

pub(super) fn timed_out(timeout: f64) -> PyErr {
    PyTimeoutError::new_err(format!(
        "no room in the budget within the timeout of {timeout} s"
    ))
}

/// Waits on this thread for `cost` on `budget`, with the GIL released. Signals are checked every
/// 50 ms on the main thread, so Ctrl-C interrupts the wait (which then takes nothing).
pub(super) fn block_for(
    py: Python<'_>,
    call: &str,
    budget: &dyn Waitable,
    cost: u64,
    timeout: Option<f64>,
) -> PyResult<()> {
    refuse_on_a_loop(py, call)?;
    if budget.try_reserve(cost) {
        return Ok(());
    }
    if timeout == Some(0.0) {
        return Err(timed_out(0.0));
    }
    let deadline = timeout
        .and_then(|t| Duration::try_from_secs_f64(t).ok())
        .and_then(|t| Instant::now().checked_add(t));
    let threading = py.import("threading")?;
    let main = threading.call_method0("main_thread")?.getattr("ident")?;
    let here = threading.call_method0("get_ident")?;
    let check_every = main.eq(here)?.then_some(Duration::from_millis(50));
    let mut signal: Option<PyErr> = None;
    let outcome = py.detach(|| {
        wait_blocking(budget, cost, deadline, check_every, || {
            // `try_attach`: an interpreter that is shutting down has no signal to deliver.
            signal = Python::try_attach(|py| py.check_signals().err()).flatten();
            signal.is_some()
        })
    });
    match outcome {
        Ok(()) => Ok(()),
        Err(WaitError::TimedOut) => Err(timed_out(timeout.unwrap_or(f64::INFINITY))),
        Err(WaitError::Interrupted) => {
            Err(signal.unwrap_or_else(|| PyRuntimeError::new_err("the wait was interrupted")))
        }
    }
}
