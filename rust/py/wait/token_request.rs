//! `TokenRequest`: what `AtomicTokenBudget.reserve_tokens()` returns.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use pyo3::exceptions::PyRuntimeError;

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::PyNone;
use pyo3::{BoundObject, PyTraverseError};

use super::arguments::check_fits;
use super::blocking::block_for;
use super::request::{GRANTED, PENDING, RELEASED, enter_once, enter_wait, reset, used_up};
use super::waiter::WaiterPy;
use crate::core::{Hold, TokenLedger};
use crate::py::awaitable::Awaitable;
use crate::py::coroutine::{Delegate, FastAwait, Step, step_to_python, to_exception};

/// How token requests issue and refund reservations. The token budget's module owns
/// `TokenReservation`, and it imports this one (to make requests), so it is handed over at
/// import ([`use_reservations`]) rather than imported from here.
#[derive(Clone, Copy)]
pub(crate) struct Reservations {
    /// Wraps a granted hold in an armed `TokenReservation` (refunding it if that fails).
    pub(crate) issue: for<'py> fn(Python<'py>, Hold) -> PyResult<Bound<'py, PyAny>>,
    /// Refunds a reservation if it is still armed.
    pub(crate) refund: fn(&Bound<'_, PyAny>) -> PyResult<()>,
}

/// Set once, at import; a pair of plain functions, the same for every caller.
static RESERVATIONS: OnceLock<Reservations> = OnceLock::new();

/// Hands token requests the token budget's reservations (the module's initialisation).
pub(crate) fn use_reservations(reservations: Reservations) {
    let _ = RESERVATIONS.set(reservations);
}

/// The reservations handed over at import. Fetched before a hold is taken, so that a missing
/// hand-over can never strand one.
fn reservations() -> PyResult<Reservations> {
    RESERVATIONS
        .get()
        .copied()
        .ok_or_else(|| PyRuntimeError::new_err("costbound._native was not initialised"))
}

/// The result of `AtomicTokenBudget.reserve_tokens()`: awaiting it waits for the estimate and
/// returns an armed `TokenReservation`; as an async context manager it refunds an armed one on
/// exit. It is single-use: entered once, and once exited it cannot be awaited or entered again.
#[pyclass(frozen, module = "costbound._native", name = "TokenRequest")]
pub(crate) struct TokenRequestPy {
    ledger: Arc<TokenLedger>,
    estimate: u64,
    timeout: Option<f64>,
    state: AtomicU8,
    /// Whether an `async with` block took it (a wait that failed clears it).
    entered: AtomicBool,
    reservation: Mutex<Option<Py<PyAny>>>,
    /// The wait it hands its steps to while an asyncio task drives it.
    delegate: Delegate,
}

impl TokenRequestPy {
    pub(crate) fn new(ledger: Arc<TokenLedger>, estimate: u64, timeout: Option<f64>) -> Self {
        Self {
            ledger,
            estimate,
            timeout,
            state: AtomicU8::new(PENDING),
            entered: AtomicBool::new(false),
            reservation: Mutex::new(None),
            delegate: Delegate::new(),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Py<PyAny>>> {
        self.reservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `reservation` for the context manager. Whatever the slot held before is dropped
    /// after the lock is released: dropping an armed reservation calls its refund, which may
    /// run Python code, and no lock is held across a call into Python.
    fn keep(&self, reservation: Option<Py<PyAny>>) {
        let previous = std::mem::replace(&mut *self.slot(), reservation);
        drop(previous);
    }

    /// Issues the reservation for a granted `hold` and keeps it for the context manager.
    fn adopt(&self, py: Python<'_>, issuer: Reservations, hold: Hold) -> PyResult<Py<PyAny>> {
        let reservation = (issuer.issue)(py, hold)?.unbind();
        self.keep(Some(reservation.clone_ref(py)));
        self.state.store(GRANTED, Ordering::Release);
        Ok(reservation)
    }

    /// Waits on this thread; `reserve_tokens_blocking`.
    pub(crate) fn block<'py>(
        py: Python<'py>,
        ledger: &Arc<TokenLedger>,
        estimate: u64,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        check_fits("estimate", estimate, ledger.capacity())?;
        let issue = reservations()?.issue;
        block_for(py, "reserve_tokens_blocking", &**ledger, estimate, timeout)?;
        issue(py, Hold::adopt(ledger, estimate))
    }
}

impl FastAwait for TokenRequestPy {
    fn enter<'py>(slf: Borrowed<'_, 'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        let py = slf.py();
        enter_wait(
            slf,
            &this.state,
            &this.entered,
            this.timeout,
            || used_up("token request", "reserve_tokens"),
            || match (
                reservations()?.issue,
                Hold::try_reserve(&this.ledger, this.estimate),
            ) {
                (issue, Some(hold)) => {
                    let reservation = issue(py, hold)?.unbind();
                    this.keep(Some(reservation));
                    Ok(true)
                }
                (_, None) => Ok(false),
            },
        )
    }

    fn step<'py>(slf: Borrowed<'_, 'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get()
            .slot()
            .as_ref()
            .map(|r| r.bind(py).clone())
            .ok_or_else(|| used_up("token request", "reserve_tokens"))
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
impl TokenRequestPy {
    /// The estimate requested.
    #[getter]
    fn estimate(&self) -> u64 {
        self.estimate
    }

    fn __await__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Self::enter(slf.as_borrowed()).map(Bound::unbind)
    }

    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let none = PyNone::get(slf.py()).into_any();
        step_to_python(Self::resume(slf.as_borrowed(), none))
    }

    /// One step of the request driven as a coroutine (as asyncio's tasks drive it).
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

    fn __aenter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let this = slf.get();
        enter_once(
            &this.state,
            &this.entered,
            "token request",
            "reserve_tokens",
        )?;
        Ok(slf.clone().unbind())
    }

    /// Refunds the reservation if it is still armed (not recorded, not disarmed); the request
    /// is then used up.
    fn __aexit__(
        &self,
        py: Python<'_>,
        _kind: &Bound<'_, PyAny>,
        _value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<Py<Awaitable>> {
        let reservation = self.slot().take();
        if self
            .state
            .compare_exchange(GRANTED, RELEASED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            if let Some(reservation) = reservation {
                (reservations()?.refund)(reservation.bind(py))?;
            }
        }
        Awaitable::none(py)
    }

    /// Queues this request (the suspended wait's first step).
    fn _enqueue(&self, py: Python<'_>, wake: &Bound<'_, PyAny>) -> PyResult<Py<WaiterPy>> {
        WaiterPy::enqueue(
            py,
            self,
            &self.state,
            self.ledger.clone(),
            self.estimate,
            wake,
        )
    }

    /// Takes the waiter's grant and returns the armed reservation that now holds it. Only this
    /// request's own waiter is accepted.
    fn _finish(&self, py: Python<'_>, waiter: &Bound<'_, WaiterPy>) -> PyResult<Py<PyAny>> {
        let issuer = reservations()?;
        let estimate = waiter.get().claim(self)?;
        self.adopt(py, issuer, Hold::adopt(&self.ledger, estimate))
    }

    /// The wait ended without a grant: the request may be awaited again.
    fn _reset(&self) {
        reset(&self.state, &self.entered);
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // The locks are never held across a call into Python, so they are free during a
        // collection; skipping a visit would only keep an object alive longer.
        if let Ok(reservation) = self.reservation.try_lock() {
            visit.call(&*reservation)?;
        }
        self.delegate.traverse(&visit)
    }

    fn __clear__(&self) {
        let reservation = self.slot().take();
        drop(reservation);
        self.delegate.clear();
    }

    fn __repr__(&self) -> String {
        format!("<TokenRequest estimate={}>", self.estimate)
    }
}
