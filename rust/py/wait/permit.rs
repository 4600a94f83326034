//! `Permit`: what `AtomicBudget.reserve()` and `reserve_blocking()` return.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use pyo3::exceptions::PyTypeError;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::PyNone;
use pyo3::{BoundObject, PyTraverseError};

use super::arguments::check_fits;
use super::blocking::block_for;
use super::request::{GRANTED, PENDING, RELEASED, WAITING, enter_once, enter_wait, reset, used_up};
use super::waiter::WaiterPy;
use crate::core::UnitBudget;
use crate::py::awaitable::Awaitable;
use crate::py::coroutine::{Delegate, FastAwait, Step, step_to_python, to_exception};

/// The result of `AtomicBudget.reserve()` and `reserve_blocking()`: `cost` units held until
/// `release()`. Awaiting it waits for the units (once); it is also a context manager, sync for a
/// granted permit and async for a pending one, that releases on exit. It is single-use: it is
/// entered once, and once released it cannot be awaited or entered again.
#[pyclass(frozen, module = "costbound._native", name = "Permit")]
pub(crate) struct PermitPy {
    budget: Arc<UnitBudget>,
    cost: u64,
    timeout: Option<f64>,
    state: AtomicU8,
    /// Whether a `with` / `async with` block took it (a wait that failed clears it).
    entered: AtomicBool,
    /// The wait it hands its steps to while an asyncio task drives it.
    delegate: Delegate,
}

impl PermitPy {
    pub(crate) fn new(
        budget: Arc<UnitBudget>,
        cost: u64,
        timeout: Option<f64>,
        granted: bool,
    ) -> Self {
        Self {
            budget,
            cost,
            timeout,
            state: AtomicU8::new(if granted { GRANTED } else { PENDING }),
            entered: AtomicBool::new(false),
            delegate: Delegate::new(),
        }
    }

    /// Waits on this thread; `reserve_blocking`.
    pub(crate) fn block(
        py: Python<'_>,
        budget: &Arc<UnitBudget>,
        cost: u64,
        timeout: Option<f64>,
    ) -> PyResult<Self> {
        check_fits("cost", cost, budget.capacity())?;
        block_for(py, "reserve_blocking", &**budget, cost, timeout)?;
        Ok(Self::new(budget.clone(), cost, timeout, true))
    }
}

impl FastAwait for PermitPy {
    fn enter<'py>(slf: Borrowed<'_, 'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        enter_wait(
            slf,
            &this.state,
            &this.entered,
            this.timeout,
            || used_up("permit", "reserve"),
            || Ok(this.budget.try_reserve(this.cost)),
        )
    }

    fn step<'py>(slf: Borrowed<'_, 'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Ok(slf.to_owned().into_any())
    }

    fn resume<'py>(
        slf: Borrowed<'_, 'py, Self>,
        value: Borrowed<'_, 'py, PyAny>,
    ) -> PyResult<Step<'py>> {
        let this = slf.get();
        if this.state.load(Ordering::Acquire) == GRANTED {
            return Self::step(slf).map(Step::Return);
        }
        this.delegate.resume(slf, value)
    }

    fn throw<'py>(
        slf: Borrowed<'_, 'py, Self>,
        exception: Bound<'py, PyAny>,
    ) -> PyResult<Step<'py>> {
        slf.get().delegate.throw(slf.py(), exception)
    }

    fn close(slf: Borrowed<'_, '_, Self>) -> PyResult<()> {
        slf.get().delegate.close(slf.py())
    }
}

#[pymethods]
impl PermitPy {
    /// The units this permit holds (or waits for).
    #[getter]
    fn cost(&self) -> u64 {
        self.cost
    }

    /// Whether `release()` gave the units back.
    #[getter]
    fn released(&self) -> bool {
        self.state.load(Ordering::Acquire) == RELEASED
    }

    /// Whether the units were granted (and not yet released).
    #[getter]
    fn granted(&self) -> bool {
        self.state.load(Ordering::Acquire) == GRANTED
    }

    /// Gives the units back the first time it is called on a granted permit; afterwards, and
    /// on a permit that was never granted, it does nothing.
    fn release(&self) {
        if self
            .state
            .compare_exchange(GRANTED, RELEASED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.budget.release(self.cost);
        }
    }

    fn __await__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Self::enter(slf.as_borrowed()).map(Bound::unbind)
    }

    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let none = PyNone::get(slf.py()).into_any();
        step_to_python(Self::resume(slf.as_borrowed(), none))
    }

    /// One step of the permit driven as a coroutine (as asyncio's tasks drive it).
    fn send(slf: &Bound<'_, Self>, value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        step_to_python(Self::resume(slf.as_borrowed(), value.as_borrowed()))
    }

    /// Throws into the wait in progress (a cancelled task); before any wait it propagates.
    #[pyo3(signature = (exception, value = None, traceback = None))]
    fn throw(
        slf: &Bound<'_, Self>,
        exception: &Bound<'_, PyAny>,
        value: Option<&Bound<'_, PyAny>>,
        traceback: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let _ = traceback; // the legacy third argument of `generator.throw`
        let exception = to_exception(exception, value)?;
        step_to_python(<Self as FastAwait>::throw(slf.as_borrowed(), exception))
    }

    /// Ends the wait in progress, if any: it leaves the queue and takes nothing.
    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        <Self as FastAwait>::close(slf.as_borrowed())
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let this = slf.get();
        match this.state.load(Ordering::Acquire) {
            PENDING | WAITING => Err(PyTypeError::new_err(
                "a permit from reserve() is entered with `async with`; use reserve_blocking() for `with`",
            )),
            _ => {
                enter_once(&this.state, &this.entered, "permit", "reserve")?;
                Ok(slf.clone().unbind())
            }
        }
    }

    fn __exit__(
        &self,
        _kind: &Bound<'_, PyAny>,
        _value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) {
        self.release();
    }

    fn __aenter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let this = slf.get();
        enter_once(&this.state, &this.entered, "permit", "reserve")?;
        Ok(slf.clone().unbind())
    }

    fn __aexit__(
        &self,
        py: Python<'_>,
        _kind: &Bound<'_, PyAny>,
        _value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<Py<Awaitable>> {
        self.release();
        Awaitable::none(py)
    }

    /// Queues this permit's request (the suspended wait's first step).
    fn _enqueue(&self, py: Python<'_>, wake: &Bound<'_, PyAny>) -> PyResult<Py<WaiterPy>> {
        WaiterPy::enqueue(py, self, &self.state, self.budget.clone(), self.cost, wake)
    }

    /// Takes the waiter's grant: the permit now holds the units. Only this permit's own waiter
    /// is accepted.
    fn _finish(slf: &Bound<'_, Self>, waiter: &Bound<'_, WaiterPy>) -> PyResult<Py<Self>> {
        let this = slf.get();
        waiter.get().claim(this)?;
        this.state.store(GRANTED, Ordering::Release);
        Ok(slf.clone().unbind())
    }

    /// The wait ended without a grant: the permit may be awaited again.
    fn _reset(&self) {
        reset(&self.state, &self.entered);
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.delegate.traverse(&visit)
    }

    fn __clear__(&self) {
        self.delegate.clear();
    }

    fn __repr__(&self) -> String {
        let state = match self.state.load(Ordering::Acquire) {
            PENDING => "pending",
            WAITING => "waiting",
            GRANTED => "granted",
            _ => "released",
        };
        format!("<Permit cost={} {state}>", self.cost)
    }
}
