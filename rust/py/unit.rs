//! `AtomicBudget`: unit costs reserved and released symmetrically.

use std::ffi::CStr;

use pyo3::prelude::*;
use pyo3::types::PyBool;
use pyo3::types::PyFloat;

use std::sync::Arc;

use super::args::to_u64;
use super::awaitable::{Awaitable, Grant};
use super::fastcall::{U64Method, U64TimeoutMethod};
use super::wait::{
    PermitPy, WatchPy, check_fits, rate_error, seconds_until, to_clock, to_rate, to_timeout,
};
use crate::core::{UnitBudget, Waitable};

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
    core: Arc<UnitBudget>,
}

impl Grant for AtomicBudgetPy {
    /// The grant an awaited `try_reserve` makes: `True`, or `False` and no change.
    fn grant<'py>(&self, py: Python<'py>, cost: u64) -> PyResult<Bound<'py, PyAny>> {
        Ok(PyBool::new(py, self.core.try_reserve(cost))
            .to_owned()
            .into_any())
    }
}

#[pymethods]
impl AtomicBudgetPy {
    #[new]
    #[pyo3(signature = (capacity, *, rate = None, clock = None))]
    fn new(
        capacity: &Bound<'_, PyAny>,
        rate: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let capacity = to_u64(capacity, "capacity", u64::MAX)?;
        let rate = to_rate(rate)?;
        let clock = to_clock(clock)?;
        let core = if rate == 0.0 && !rate.is_nan() {
            Arc::new(UnitBudget::new(capacity))
        } else {
            UnitBudget::with_rate(capacity, rate, clock).map_err(|e| rate_error(e, rate))?
        };
        Ok(Self { core })
    }

    /// Units that flow back per second, up to `capacity` (`0.0`: none).
    #[getter]
    fn rate(&self) -> f64 {
        self.core.rate()
    }

    /// How many `reserve` calls wait in the queue now.
    #[getter]
    fn waiters(&self) -> usize {
        self.core.waiters()
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

    /// Restores `available` to `capacity`, and grants the waiters that now fit.
    fn refill(&self) {
        self.core.refill();
    }

    /// Watches the budget for an admission across budgets (`costbound._admit`).
    fn _watch(&self, wake: &Bound<'_, PyAny>) -> WatchPy {
        WatchPy::start(self.core.clone(), wake)
    }

    /// Whether a non-waiting reservation of `amount` would be granted now (nothing changes):
    /// an admission's look before it takes anything.
    fn _fits(&self, amount: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.core.fits(to_u64(amount, "amount", u64::MAX)?))
    }

    /// How many admissions watch the budget now.
    #[getter]
    fn _watchers(&self) -> usize {
        self.core.watchers()
    }

    /// Seconds until the rate refill alone makes `amount` available (`None` if only another
    /// event can), for an admission's timer.
    fn _seconds_until(&self, amount: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
        let amount = to_u64(amount, "amount", u64::MAX)?;
        Ok(seconds_until(&*self.core, amount))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let core = &slf.get().core;
        let rate = core.rate();
        Ok(format!(
            "{}(capacity={}, available={}{})",
            slf.get_type().qualname()?,
            core.capacity(),
            core.available(),
            if rate > 0.0 {
                format!(", rate={}", PyFloat::new(slf.py(), rate).repr()?)
            } else {
                String::new()
            }
        ))
    }
}

/// Declares a method of `AtomicBudget` taking one integer and an optional `timeout`, entered
/// through [`super::fastcall`].
macro_rules! unit_timeout_method {
    ($(#[$meta:meta])* $kind:ident, $name:literal, $doc:literal, |$this:ident, $value:ident, $timeout:ident| $body:expr) => {
        $(#[$meta])*
        pub(crate) struct $kind;

        impl U64TimeoutMethod for $kind {
            type Class = AtomicBudgetPy;
            const NAME: &'static CStr = $name;
            const ARG: &'static str = "cost";
            const DOC: &'static CStr = $doc;
            fn call(
                $this: &Bound<'_, AtomicBudgetPy>,
                $value: &Bound<'_, PyAny>,
                $timeout: Option<&Bound<'_, PyAny>>,
            ) -> PyResult<Py<PyAny>> {
                $body
            }
        }
    };
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
        Ok(Awaitable::deferred(this, cost)?.into_any())
    }
);

unit_method!(
    /// `release(cost)`: the units are given back when called.
    Release,
    c"release",
    c"release($self, /, cost)\n--\n\n`release_sync` as an awaitable. The units are given back when called, so a release is\nnever lost to a cancellation.",
    |this, cost| {
        this.get().core.release(cost);
        Ok(Awaitable::none(this.py())?.into_any())
    }
);

unit_timeout_method!(
    /// `reserve(cost, *, timeout=None)`.
    Reserve,
    c"reserve",
    c"reserve($self, /, cost, *, timeout=None)\n--\n\nA `Permit` for `cost` units: `await` it (or `async with` it) to wait until they fit, first\ncome, first served. `TimeoutError` after `timeout` seconds with nothing taken; a cost\nabove `capacity` is a `ValueError` at once.",
    |this, cost, timeout| {
        let core = &this.get().core;
        let cost = to_u64(cost, "cost", u64::MAX)?;
        let timeout = to_timeout(timeout)?;
        check_fits("cost", cost, core.capacity())?;
        let permit = PermitPy::new(core.clone(), cost, timeout, false);
        Ok(Py::new(this.py(), permit)?.into_any())
    }
);

unit_timeout_method!(
    /// `reserve_blocking(cost, *, timeout=None)`.
    ReserveBlocking,
    c"reserve_blocking",
    c"reserve_blocking($self, /, cost, *, timeout=None)\n--\n\nWaits on this thread until `cost` units fit and returns the granted `Permit` (a context\nmanager that releases on exit). `TimeoutError` after `timeout` seconds; `RuntimeError` on\na thread that runs an event loop.",
    |this, cost, timeout| {
        let cost = to_u64(cost, "cost", u64::MAX)?;
        let timeout = to_timeout(timeout)?;
        let permit = PermitPy::block(this.py(), &this.get().core, cost, timeout)?;
        Ok(Py::new(this.py(), permit)?.into_any())
    }
);
