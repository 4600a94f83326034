//! `AtomicTokenBudget`: the lock-free token budget with debt. Its reservations are in
//! [`super::reservation`].

use std::ffi::CStr;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyFloat;

use super::args::{to_u64, type_name};
use super::awaitable::{Awaitable, Grant};
use super::error::Error;
use super::fastcall::U64TimeoutMethod;
use super::reservation::{ReservationPy, issue_reservation};
use super::wait::{
    TokenRequestPy, WatchPy, check_fits, rate_error, seconds_until, to_clock, to_rate, to_timeout,
};
use crate::core::{Hold, MAX_TOKEN_CAPACITY, RecordError, TokenLedger, Waitable};

/// A lock-free token budget with debt. Subclassed by `costbound.AtomicTokenBudget`.
#[pyclass(
    frozen,
    subclass,
    weakref,
    module = "costbound._native",
    name = "AtomicTokenBudget"
)]
pub(crate) struct AtomicTokenBudgetPy {
    ledger: Arc<TokenLedger>,
}

impl AtomicTokenBudgetPy {
    /// An armed reservation of `estimate`, or `None` if it does not fit.
    pub(crate) fn grant_tokens<'py>(
        &self,
        py: Python<'py>,
        estimate: u64,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        Hold::try_reserve(&self.ledger, estimate)
            .map(|hold| issue_reservation(py, hold))
            .transpose()
    }
}

impl Grant for AtomicTokenBudgetPy {
    /// The grant an awaited `try_reserve_tokens` makes: an armed reservation, or `None`.
    fn grant<'py>(&self, py: Python<'py>, estimate: u64) -> PyResult<Bound<'py, PyAny>> {
        Ok(self
            .grant_tokens(py, estimate)?
            .unwrap_or_else(|| py.None().into_bound(py)))
    }
}

#[pymethods]
impl AtomicTokenBudgetPy {
    #[new]
    #[pyo3(signature = (capacity, *, rate = None, clock = None))]
    fn new(
        capacity: &Bound<'_, PyAny>,
        rate: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let capacity = to_u64(capacity, "capacity", MAX_TOKEN_CAPACITY)?;
        let rate = to_rate(rate)?;
        let clock = to_clock(clock)?;
        let ledger = if rate == 0.0 {
            Arc::new(TokenLedger::new(capacity))
        } else {
            TokenLedger::with_rate(capacity, rate, clock).map_err(|e| rate_error(e, rate))?
        };
        Ok(Self { ledger })
    }

    /// Tokens that flow back per second, paying debt first, up to `capacity` (`0.0`: none).
    #[getter]
    fn rate(&self) -> f64 {
        self.ledger.rate()
    }

    /// How many `reserve_tokens` calls wait in the queue now.
    #[getter]
    fn waiters(&self) -> usize {
        self.ledger.waiters()
    }

    /// The capacity given at construction.
    #[getter]
    fn capacity(&self) -> u64 {
        self.ledger.capacity()
    }

    /// Tokens available now; `0` while in debt.
    #[getter]
    fn available(&self) -> u64 {
        self.ledger.available()
    }

    /// Overage not yet covered by refunds or refills.
    #[getter]
    fn debt(&self) -> u64 {
        self.ledger.debt()
    }

    /// Prompt + completion tokens recorded since construction.
    #[getter]
    fn consumed(&self) -> u64 {
        self.ledger.consumed()
    }

    /// Adds `capacity` to the balance, capped at `capacity`: pays any debt first.
    fn refill(&self) {
        self.ledger.refill();
    }

    /// An armed reservation of `estimate` tokens, or `None` (and no change) if it does not fit.
    fn try_reserve_tokens_sync<'py>(
        &self,
        py: Python<'py>,
        estimate: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.grant_tokens(py, to_u64(estimate, "estimate", u64::MAX)?)
    }

    /// Disarms `reservation` and settles it against `prompt + completion` tokens.
    fn record_usage_sync(
        &self,
        reservation: &Bound<'_, PyAny>,
        prompt: &Bound<'_, PyAny>,
        completion: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let prompt = to_u64(prompt, "prompt", u64::MAX)?;
        let completion = to_u64(completion, "completion", u64::MAX)?;
        let reservation = reservation
            .cast::<ReservationPy>()
            .map_err(|_| Error::WrongType {
                name: "reservation",
                expected: "a TokenReservation",
                type_name: type_name(reservation),
            })?;
        let reservation = reservation.get();
        // The hold's single-use claim decides which of several threads recording, disarming or
        // dropping one reservation wins; no lock is held while the settlement wakes waiters,
        // whose wake-ups run Python code.
        let Some(hold) = reservation.hold() else {
            // A Python refund: a custom backend's reservation, never this budget's.
            return Err(Error::from(if reservation.armed() {
                RecordError::Foreign
            } else {
                RecordError::AlreadyReconciled
            })
            .into());
        };
        hold.record(&self.ledger, prompt, completion)
            .map_err(Error::from)?;
        Ok(())
    }

    /// Tokens recorded since construction (the same value as `consumed`).
    fn tokens_consumed_sync(&self) -> u64 {
        self.ledger.consumed()
    }

    /// `try_reserve_tokens_sync` as an awaitable. The argument is checked when called; the
    /// tokens are reserved when it is awaited, as a coroutine would.
    fn try_reserve_tokens(
        slf: &Bound<'_, Self>,
        estimate: &Bound<'_, PyAny>,
    ) -> PyResult<Py<Awaitable>> {
        Awaitable::deferred(slf, to_u64(estimate, "estimate", u64::MAX)?)
    }

    /// `record_usage_sync` as an awaitable. The usage is recorded when called, so a recording
    /// is never lost to a cancellation.
    fn record_usage(
        &self,
        py: Python<'_>,
        reservation: &Bound<'_, PyAny>,
        prompt: &Bound<'_, PyAny>,
        completion: &Bound<'_, PyAny>,
    ) -> PyResult<Py<Awaitable>> {
        self.record_usage_sync(reservation, prompt, completion)?;
        Awaitable::none(py)
    }

    /// `consumed` as an awaitable, read when called.
    fn tokens_consumed(&self, py: Python<'_>) -> PyResult<Py<Awaitable>> {
        let consumed = self.ledger.consumed().into_pyobject(py)?.into_any();
        Awaitable::ready(py, consumed.unbind())
    }

    /// Watches the budget for an admission across budgets (`costbound._admit`).
    fn _watch(&self, wake: &Bound<'_, PyAny>) -> WatchPy {
        WatchPy::start(self.ledger.clone(), wake)
    }

    /// Whether a non-waiting reservation of `amount` would be granted now (nothing changes):
    /// an admission's look before it takes anything.
    fn _fits(&self, amount: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.ledger.fits(to_u64(amount, "amount", u64::MAX)?))
    }

    /// How many admissions watch the budget now.
    #[getter]
    fn _watchers(&self) -> usize {
        self.ledger.watchers()
    }

    /// Seconds until the rate refill alone makes `amount` available (`None` if only another
    /// event can), for an admission's timer.
    fn _seconds_until(&self, amount: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
        let amount = to_u64(amount, "amount", u64::MAX)?;
        Ok(seconds_until(&*self.ledger, amount))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let ledger = &slf.get().ledger;
        let rate = ledger.rate();
        Ok(format!(
            "{}(capacity={}, available={}, debt={}, consumed={}{})",
            slf.get_type().qualname()?,
            ledger.capacity(),
            ledger.available(),
            ledger.debt(),
            ledger.consumed(),
            if rate > 0.0 {
                format!(", rate={}", PyFloat::new(slf.py(), rate).repr()?)
            } else {
                String::new()
            }
        ))
    }
}

/// Declares a method of `AtomicTokenBudget` taking one integer and an optional `timeout`,
/// entered through [`super::fastcall`].
macro_rules! token_timeout_method {
    ($(#[$meta:meta])* $kind:ident, $name:literal, $doc:literal, |$this:ident, $value:ident, $timeout:ident| $body:expr) => {
        $(#[$meta])*
        pub(crate) struct $kind;

        impl U64TimeoutMethod for $kind {
            type Class = AtomicTokenBudgetPy;
            const NAME: &'static CStr = $name;
            const ARG: &'static str = "estimate";
            const DOC: &'static CStr = $doc;
            fn call(
                $this: &Bound<'_, AtomicTokenBudgetPy>,
                $value: &Bound<'_, PyAny>,
                $timeout: Option<&Bound<'_, PyAny>>,
            ) -> PyResult<Py<PyAny>> {
                $body
            }
        }
    };
}

token_timeout_method!(
    /// `reserve_tokens(estimate, *, timeout=None)`.
    ReserveTokens,
    c"reserve_tokens",
    c"reserve_tokens($self, /, estimate, *, timeout=None)\n--\n\nA request for `estimate` tokens: `await` it to wait until it fits (first come, first served)\nand get an armed `TokenReservation`; as an async context manager it refunds an armed\nreservation on exit. `TimeoutError` after `timeout` seconds with nothing taken; an\nestimate above `capacity` is a `ValueError` at once.",
    |this, estimate, timeout| {
        let ledger = &this.get().ledger;
        let estimate = to_u64(estimate, "estimate", u64::MAX)?;
        let timeout = to_timeout(timeout)?;
        check_fits("estimate", estimate, ledger.capacity())?;
        let request = TokenRequestPy::new(ledger.clone(), estimate, timeout);
        Ok(Py::new(this.py(), request)?.into_any())
    }
);

token_timeout_method!(
    /// `reserve_tokens_blocking(estimate, *, timeout=None)`.
    ReserveTokensBlocking,
    c"reserve_tokens_blocking",
    c"reserve_tokens_blocking($self, /, estimate, *, timeout=None)\n--\n\nWaits on this thread until `estimate` fits and returns the armed `TokenReservation` (a\ncontext manager that refunds it on exit unless recorded). `TimeoutError` after `timeout`\nseconds; `RuntimeError` on a thread that runs an event loop.",
    |this, estimate, timeout| {
        let estimate = to_u64(estimate, "estimate", u64::MAX)?;
        let timeout = to_timeout(timeout)?;
        Ok(TokenRequestPy::block(this.py(), &this.get().ledger, estimate, timeout)?.unbind())
    }
);
