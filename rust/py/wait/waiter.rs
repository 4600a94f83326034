//! The handle of one queued request of an async wait, which `costbound._waiting.wait` drives.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use super::request::WAITING;
use crate::core::{Waitable, Waiter};

/// A core waiter for `cost` whose wake-up calls the Python callable `wake()` (from whichever
/// thread makes room, never under a lock); an exception it raises is reported as unraisable.
///
/// A wake-up that comes while the interpreter shuts down (a finaliser releasing units with a
/// task still queued on a loop never closed) is skipped: no Python code can run then, and
/// the task it would wake is gone. `Python::attach` would panic there instead.
pub(super) fn python_waiter(cost: u64, wake: &Bound<'_, PyAny>) -> Arc<Waiter> {
    let wake = wake.clone().unbind();
    Waiter::new(cost, move || {
        let _ = Python::try_attach(|py| {
            if let Err(err) = wake.bind(py).call0() {
                err.write_unraisable(py, None);
            }
        });
    })
}

/// The address of a request, which identifies it while it lives (a pyclass never moves).
fn address<O>(owner: &O) -> usize {
    std::ptr::from_ref(owner) as usize
}

/// One queued request of an async wait, driven by `costbound._waiting.wait`.
#[pyclass(frozen, module = "costbound._native", name = "Waiter")]
pub(crate) struct WaiterPy {
    waiter: Arc<Waiter>,
    budget: Arc<dyn Waitable>,
    /// The request that queued it (its address, compared only): only that request's
    /// `_finish` may take the grant.
    owner: usize,
    /// Whether the grant (or the decision that there is none) has an owner.
    claimed: AtomicBool,
}

impl WaiterPy {
    /// Queues the request of `owner` (a permit or token request in its `WAITING` state) for
    /// `cost`; its grant calls `wake()` (from any thread).
    pub(super) fn enqueue<O>(
        py: Python<'_>,
        owner: &O,
        state: &AtomicU8,
        budget: Arc<dyn Waitable>,
        cost: u64,
        wake: &Bound<'_, PyAny>,
    ) -> PyResult<Py<Self>> {
        if state.load(Ordering::Acquire) != WAITING {
            return Err(PyRuntimeError::new_err(
                "only a request being awaited can be queued",
            ));
        }
        let waiter = python_waiter(cost, wake);
        let handle = Py::new(
            py,
            Self {
                waiter: waiter.clone(),
                budget: budget.clone(),
                owner: address(owner),
                claimed: AtomicBool::new(false),
            },
        )?;
        budget.enqueue(waiter);
        Ok(handle)
    }

    /// Takes ownership of the grant for `owner`: `ValueError` (and nothing changes) for a
    /// waiter another request queued, `RuntimeError` if there is no grant to take.
    pub(super) fn claim<O>(&self, owner: &O) -> PyResult<u64> {
        if self.owner != address(owner) {
            return Err(PyValueError::new_err(
                "this waiter was queued by another request: only its own waiter finishes a wait",
            ));
        }
        if self.waiter.is_granted() && !self.claimed.swap(true, Ordering::AcqRel) {
            Ok(self.waiter.cost())
        } else {
            Err(PyRuntimeError::new_err("this waiter has no grant to claim"))
        }
    }
}

#[pymethods]
impl WaiterPy {
    /// Whether the queue granted it.
    #[getter]
    fn granted(&self) -> bool {
        self.waiter.is_granted()
    }

    /// Grants whatever fits now; then, if still waiting and first in line on a budget with a
    /// rate, the seconds until the refill makes it fit (`None` otherwise).
    fn poll(&self) -> Option<f64> {
        self.budget.drain();
        if self.waiter.is_granted() {
            return None;
        }
        #[allow(clippy::cast_precision_loss)] // a timer's delay
        self.budget
            .nanos_until_fits(&self.waiter)
            .map(|nanos| nanos as f64 / 1e9)
    }

    /// Leaves the queue. Returns whether it had been granted first (the grant is then still to
    /// be claimed or given back).
    fn withdraw(&self) -> bool {
        self.budget.cancel(&self.waiter)
    }

    /// Gives a grant that will not be used back to the budget, once.
    fn give_back(&self) {
        if self.waiter.is_granted() && !self.claimed.swap(true, Ordering::AcqRel) {
            self.budget.give_back(self.waiter.cost());
        }
    }
}

impl Drop for WaiterPy {
    /// A backstop for a wait abandoned without its clean-up (a coroutine never closed): leave
    /// the queue, and give back a grant no one claimed.
    fn drop(&mut self) {
        if !self.claimed.swap(true, Ordering::AcqRel) && self.budget.cancel(&self.waiter) {
            self.budget.give_back(self.waiter.cost());
        }
    }
}
