//! A watch on a budget, which an admission across budgets (`costbound._admit`) waits on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;

use super::waiter::python_waiter;
use crate::core::{Waitable, Waiter};

/// A watch on a budget for an admission across budgets: `wake()` is called (from any thread)
/// at every change that adds room or shortens the budget's queue, until `close()`. It takes no
/// place in the queue and is granted nothing.
#[pyclass(frozen, module = "costbound._native", name = "Watch")]
pub(crate) struct WatchPy {
    watcher: Arc<Waiter>,
    budget: Arc<dyn Waitable>,
    open: AtomicBool,
}

impl WatchPy {
    /// Starts watching `budget`.
    pub(crate) fn start(budget: Arc<dyn Waitable>, wake: &Bound<'_, PyAny>) -> Self {
        let watcher = python_waiter(0, wake);
        budget.watch(watcher.clone());
        Self {
            watcher,
            budget,
            open: AtomicBool::new(true),
        }
    }
}

#[pymethods]
impl WatchPy {
    /// Stops the watch; later calls do nothing.
    fn close(&self) {
        if self.open.swap(false, Ordering::AcqRel) {
            self.budget.unwatch(&self.watcher);
        }
    }
}

impl Drop for WatchPy {
    fn drop(&mut self) {
        self.close();
    }
}

/// Seconds until the rate refill alone makes `amount` available on `budget` (`None` if only
/// another event can), for an admission's timer.
pub(crate) fn seconds_until(budget: &dyn Waitable, amount: u64) -> Option<f64> {
    #[allow(clippy::cast_precision_loss)] // a timer's delay
    budget
        .nanos_until_available(amount)
        .map(|nanos| nanos as f64 / 1e9)
}
