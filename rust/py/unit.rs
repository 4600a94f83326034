//! `AtomicBudget`: unit costs reserved and released symmetrically.

use std::ffi::CStr;

use pyo3::prelude::*;
use pyo3::types::PyBool;

use super::args::to_u64;
use super::awaitable::{Awaitable, Grant};
use super::fastcall::U64Method;
use crate::core::UnitBudget;

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

/// Declares a one-integer method of `AtomicBudget` entered through [`super::fastcall`].
macro_rules! unit_method {
    ($(#[$meta:meta])* $kind:ident, $name:literal, $doc:literal, |$this:ident, $cost:ident| $body:expr) => {
        $(#[$meta])*
        pub(crate) struct $kind;

        impl U64Method for $kind {
            type Class = AtomicBudgetPy;
            const NAME: &'static CStr = $name;
            const ARG: &'static str = "cost";
            const MAX: u64 = u64::MAX;
            const DOC: &'static CStr = $doc;
            fn call($this: &Bound<'_, AtomicBudgetPy>, $cost: u64) -> PyResult<Py<PyAny>> {
                $body
            }
        }
    };
}

unit_method!(
    /// `try_reserve_sync(cost)`.
    TryReserveSync,
    c"try_reserve_sync",
    c"try_reserve_sync($self, /, cost)\n--\n\nTakes `cost` units if available; `False` (and no change) otherwise.",
    |this, cost| {
        let granted = this.get().core.try_reserve(cost);
        Ok(PyBool::new(this.py(), granted).to_owned().into_any().unbind())
    }
);

unit_method!(
    /// `release_sync(cost)`.
    ReleaseSync,
    c"release_sync",
    c"release_sync($self, /, cost)\n--\n\nGives `cost` units back; `available` never exceeds `capacity`.",
    |this, cost| {
        this.get().core.release(cost);
        Ok(this.py().None())
    }
);

unit_method!(
    /// `try_reserve(cost)`: the units are taken when the awaitable is awaited.
    TryReserve,
    c"try_reserve",
    c"try_reserve($self, /, cost)\n--\n\n`try_reserve_sync` as an awaitable. The argument is checked when called; the units are\ntaken when it is awaited, so a task cancelled before it starts takes nothing.",
    |this, cost| {
        let grant = Grant::Units(this.clone().unbind(), cost);
        Ok(Awaitable::deferred(this.py(), grant)?.into_any())
    }
);

unit_method!(
    /// `release(cost)`: the units are given back when called.
    Release,
    c"release",
    c"release($self, /, cost)\n--\n\n`release_sync` as an awaitable. The units are given back when called, so a release is\nnever lost to a cancellation.",
    |this, cost| {
        this.get().core.release(cost);
        Ok(Awaitable::none(this.py()).into_any())
    }
);
