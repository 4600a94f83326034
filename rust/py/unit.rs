//! `AtomicBudget`: unit costs reserved and released symmetrically.

use std::ffi::CStr;

use pyo3::prelude::*;

use super::args::to_u64;
use super::awaitable::{Awaitable, Grant};
use super::fastcall::U64Method;
use crate::core::UnitBudget;
use pyo3::ffi;

/// A lock-free budget of unit costs (rows, requests, queue slots). Subclassed by
/// `costbound.AtomicBudget`, which is what users construct.
#[pyclass(
    frozen,
    subclass,
    weakref,
    module = "costbound._native",
    name = "AtomicBudget"
)]
pub(crate) struct AtomicBudgetPy {
    core: UnitBudget,
}

impl AtomicBudgetPy {
    /// The grant an awaited `try_reserve` makes.
    pub(crate) fn reserve_units(&self, cost: u64) -> bool {
        self.core.try_reserve(cost)
    }
}

#[pymethods]
impl AtomicBudgetPy {
    #[new]
    fn new(capacity: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(Self {
            core: UnitBudget::new(to_u64(capacity, "capacity", u64::MAX)?),
        })
    }

    /// The capacity given at construction.
    #[getter]
    fn capacity(&self) -> u64 {
        self.core.capacity()
    }

    /// Units available now.
    #[getter]
    fn available(&self) -> u64 {
        self.core.available()
    }

    /// `(capacity - available) / capacity`, in `[0, 1]`; `0.0` when capacity is 0.
    #[getter]
    fn utilization(&self) -> f64 {
        self.core.utilization()
    }

    /// Restores `available` to `capacity`.
    fn refill(&self) {
        self.core.refill();
    }

    /// `try_reserve_sync` as an awaitable. The argument is checked when called; the units are
    /// taken when it is awaited, so a task cancelled before it starts takes nothing.
    fn try_reserve(slf: &Bound<'_, Self>, cost: &Bound<'_, PyAny>) -> PyResult<Py<Awaitable>> {
        let cost = to_u64(cost, "cost", u64::MAX)?;
        Awaitable::deferred(slf.py(), Grant::Units(slf.clone().unbind(), cost))
    }

    /// `release_sync` as an awaitable. The units are given back when called, so a release is
    /// never lost to a cancellation.
    fn release(&self, py: Python<'_>, cost: &Bound<'_, PyAny>) -> PyResult<Py<Awaitable>> {
        self.core.release(to_u64(cost, "cost", u64::MAX)?);
        Ok(Awaitable::none(py))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let core = &slf.get().core;
        Ok(format!(
            "{}(capacity={}, available={})",
            slf.get_type().qualname()?,
            core.capacity(),
            core.available()
        ))
    }
}

/// `AtomicBudget.try_reserve_sync(cost)`, entered without PyO3's argument parsing.
pub(crate) struct TryReserveSync;

impl U64Method for TryReserveSync {
    type Class = AtomicBudgetPy;
    const NAME: &'static CStr = c"try_reserve_sync";
    const ARG: &'static str = "cost";
    const MAX: u64 = u64::MAX;
    const DOC: &'static CStr = c"try_reserve_sync($self, cost)\n--\n\nTakes `cost` units if available; `False` (and no change) otherwise.";
    fn call(this: &AtomicBudgetPy, cost: u64) -> *mut ffi::PyObject {
        let granted = this.core.try_reserve(cost);
        // SAFETY: the bool singletons are immortal or live forever; a new reference is returned.
        unsafe { ffi::PyBool_FromLong(std::ffi::c_long::from(granted)) }
    }
}

/// `AtomicBudget.release_sync(cost)`, entered without PyO3's argument parsing.
pub(crate) struct ReleaseSync;

impl U64Method for ReleaseSync {
    type Class = AtomicBudgetPy;
    const NAME: &'static CStr = c"release_sync";
    const ARG: &'static str = "cost";
    const MAX: u64 = u64::MAX;
    const DOC: &'static CStr = c"release_sync($self, cost)\n--\n\nGives `cost` units back; `available` never exceeds `capacity`.";
    fn call(this: &AtomicBudgetPy, cost: u64) -> *mut ffi::PyObject {
        this.core.release(cost);
        // SAFETY: a new reference to None.
        unsafe {
            let none = ffi::Py_None();
            ffi::Py_IncRef(none);
            none
        }
    }
}
