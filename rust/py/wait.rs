//! Waiting for room: `Permit`, the token request that `reserve_tokens` returns, the waiter
//! handle the Python side of an async wait drives, blocking waits, and `ManualClock`.
//!
//! The fast path (room now, no one queued) is native and completes `await` without suspending.
//! Only a wait that must suspend goes to `costbound._waiting.wait`, a small coroutine that owns
//! the asyncio side (a future on the caller's loop, timers, cancellation) and drives a
//! [`WaiterPy`], whose grant the core's queue makes.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBool;

use super::awaitable::{Awaitable, FastAwait};
use super::token::{ReservationPy, issue_reservation};
use crate::core::{
    Clock, Hold, ManualClock, RateError, TokenLedger, UnitBudget, WaitError, Waitable, Waiter,
    wait_blocking,
};

const PENDING: u8 = 0;
const WAITING: u8 = 1;
const GRANTED: u8 = 2;
const RELEASED: u8 = 3;

/// `costbound._waiting.wait`, registered at import.
static WAIT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
/// `asyncio.events._get_running_loop`.
static RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Registers the coroutine function that suspended waits run: `wait(owner, timeout)`.
#[pyfunction]
pub(crate) fn register_wait(wait: &Bound<'_, PyAny>) {
    let _ = WAIT.set(wait.py(), wait.clone().unbind());
}

/// Reads a `timeout` argument: `None`, or a number of seconds `>= 0` (infinity waits forever).
pub(crate) fn to_timeout(timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f64>> {
    match timeout.filter(|t| !t.is_none()) {
        None => Ok(None),
        Some(timeout) => to_seconds(timeout, "timeout").map(Some),
    }
}

/// Reads a real number: an `int`, a `float`, or anything with `__float__` or `__index__` (a
/// NumPy scalar, a `Fraction`), but not a `bool` or a string. `what` words the errors.
fn to_real(value: &Bound<'_, PyAny>, what: &str) -> PyResult<f64> {
    let wrong_type =
        || PyTypeError::new_err(format!("{what}, not {}", super::args::type_name(value)));
    if value.is_instance_of::<PyBool>()
        || value.is_instance_of::<pyo3::types::PyString>()
        || value.is_instance_of::<pyo3::types::PyBytes>()
        || value.is_instance_of::<pyo3::types::PyByteArray>()
    {
        return Err(wrong_type());
    }
    value.extract::<f64>().map_err(|err| {
        if err.is_instance_of::<pyo3::exceptions::PyOverflowError>(value.py()) {
            PyValueError::new_err(format!("{what}; this one is too large for a float"))
        } else {
            wrong_type()
        }
    })
}

/// Reads a number of seconds `>= 0` (infinity allowed); `name` is the argument named in errors.
fn to_seconds(value: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
    let seconds = to_real(value, &format!("{name} must be a number of seconds"))?;
    if seconds.is_nan() || seconds < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a number of seconds >= 0, got {seconds}"
        )));
    }
    Ok(seconds)
}

/// Reads a `rate` argument: a number of units per second (checked by the core).
pub(crate) fn to_rate(rate: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
    match rate {
        None => Ok(0.0),
        Some(rate) => to_real(rate, "rate must be a number of units per second"),
    }
}

/// The clock a budget with `rate` reads: `clock` (a `ManualClock`) or the monotonic one.
pub(crate) fn to_clock(clock: Option<&Bound<'_, PyAny>>) -> PyResult<Clock> {
    match clock.filter(|c| !c.is_none()) {
        None => Ok(Clock::monotonic()),
        Some(clock) => clock
            .cast::<ManualClockPy>()
            .map(|c| Clock::Manual(c.get().clock.clone()))
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "clock must be a costbound.testing.ManualClock or None, not {}",
                    super::args::type_name(clock)
                ))
            }),
    }
}

/// `ValueError` for a bad rate, naming it.
pub(crate) fn rate_error(err: RateError, rate: f64) -> PyErr {
    PyValueError::new_err(format!("{err}, got {rate}"))
}

/// `ValueError` for a waiting call that can never be granted.
pub(crate) fn check_fits(name: &'static str, cost: u64, capacity: u64) -> PyResult<()> {
    if cost > capacity {
        return Err(PyValueError::new_err(format!(
            "{name} {cost} is above the capacity {capacity}: it can never fit, so waiting for it would never end"
        )));
    }
    Ok(())
}

/// `RuntimeError` if this thread is running an event loop, which a blocking wait would freeze.
fn refuse_on_a_loop(py: Python<'_>, call: &str) -> PyResult<()> {
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

fn timed_out(timeout: f64) -> PyErr {
    PyTimeoutError::new_err(format!(
        "no room in the budget within the timeout of {timeout} s"
    ))
}

/// Waits on this thread for `cost` on `budget`, with the GIL released. Signals are checked every
/// 50 ms on the main thread, so Ctrl-C interrupts the wait (which then takes nothing).
fn block_for(
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
            signal = Python::attach(|py| py.check_signals().err());
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

/// A core waiter for `cost` whose wake-up calls the Python callable `wake()` (from whichever
/// thread makes room, never under a lock); an exception it raises is reported as unraisable.
fn python_waiter(cost: u64, wake: &Bound<'_, PyAny>) -> Arc<Waiter> {
    let wake = wake.clone().unbind();
    Waiter::new(cost, move || {
        Python::attach(|py| {
            if let Err(err) = wake.call0(py) {
                err.write_unraisable(py, None);
            }
        });
    })
}

/// One queued request of an async wait, driven by `costbound._waiting.wait`.
#[pyclass(frozen, module = "costbound._native", name = "Waiter")]
pub(crate) struct WaiterPy {
    waiter: Arc<Waiter>,
    budget: Arc<dyn Waitable>,
    /// Whether the grant (or the decision that there is none) has an owner.
    claimed: AtomicBool,
}

impl WaiterPy {
    /// Queues a request for `cost` whose grant calls `wake()` (from any thread).
    fn enqueue(
        py: Python<'_>,
        budget: Arc<dyn Waitable>,
        cost: u64,
        wake: &Bound<'_, PyAny>,
    ) -> PyResult<Py<Self>> {
        let waiter = python_waiter(cost, wake);
        let handle = Py::new(
            py,
            Self {
                waiter: waiter.clone(),
                budget: budget.clone(),
                claimed: AtomicBool::new(false),
            },
        )?;
        budget.enqueue(waiter);
        Ok(handle)
    }

    /// Takes ownership of a grant; `RuntimeError` if there is none to take.
    fn claim(&self) -> PyResult<u64> {
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

/// The result of `AtomicBudget.reserve()` and `reserve_blocking()`: `cost` units held until
/// `release()`. Awaiting it waits for the units (once); it is also a context manager, sync for a
/// granted permit and async for a pending one, that releases on exit.
#[pyclass(frozen, module = "costbound._native", name = "Permit")]
pub(crate) struct PermitPy {
    budget: Arc<UnitBudget>,
    cost: u64,
    timeout: Option<f64>,
    state: AtomicU8,
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

/// Starts (or continues) the `await` of a permit or token request: the fast path, or the
/// suspended wait in `costbound._waiting`.
fn enter_wait<T: FastAwait>(
    slf: Borrowed<'_, '_, T>,
    state: &AtomicU8,
    timeout: Option<f64>,
    try_now: impl FnOnce() -> PyResult<bool>,
) -> PyResult<Py<PyAny>> {
    let py = slf.py();
    match state.compare_exchange(PENDING, WAITING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(WAITING) => {
            return Err(PyRuntimeError::new_err(
                "this request is already being awaited",
            ));
        }
        Err(_) => return Ok(slf.to_owned().into_any().unbind()), // granted: await returns at once
    }
    match try_now() {
        Ok(true) => {
            state.store(GRANTED, Ordering::Release);
            return Ok(slf.to_owned().into_any().unbind());
        }
        Ok(false) => {}
        Err(err) => {
            state.store(PENDING, Ordering::Release);
            return Err(err);
        }
    }
    if timeout == Some(0.0) {
        state.store(PENDING, Ordering::Release);
        return Err(timed_out(0.0));
    }
    let suspended = WAIT
        .get(py)
        .ok_or_else(|| PyRuntimeError::new_err("costbound._waiting was not imported"))
        .and_then(|wait| wait.call1(py, (slf.to_owned(), timeout)))
        .and_then(|coroutine| coroutine.call_method0(py, pyo3::intern!(py, "__await__")));
    if suspended.is_err() {
        state.store(PENDING, Ordering::Release);
    }
    suspended
}

impl FastAwait for PermitPy {
    fn enter(slf: Borrowed<'_, '_, Self>) -> PyResult<Py<PyAny>> {
        let this = slf.get();
        enter_wait(slf, &this.state, this.timeout, || {
            Ok(this.budget.try_reserve(this.cost))
        })
    }

    fn step(slf: Borrowed<'_, '_, Self>) -> PyResult<Py<PyAny>> {
        Ok(slf.to_owned().into_any().unbind())
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
        Self::enter(slf.as_borrowed())
    }

    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Err(pyo3::exceptions::PyStopIteration::new_err((Self::step(
            slf.as_borrowed(),
        )?,)))
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        match slf.get().state.load(Ordering::Acquire) {
            GRANTED | RELEASED => Ok(slf.clone().unbind()),
            _ => Err(PyTypeError::new_err(
                "a permit from reserve() is entered with `async with`; use reserve_blocking() for `with`",
            )),
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

    fn __aenter__(slf: &Bound<'_, Self>) -> Py<Self> {
        slf.clone().unbind()
    }

    fn __aexit__(
        &self,
        py: Python<'_>,
        _kind: &Bound<'_, PyAny>,
        _value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> Py<Awaitable> {
        self.release();
        Awaitable::none(py)
    }

    /// Queues this permit's request (the suspended wait's first step).
    fn _enqueue(&self, py: Python<'_>, wake: &Bound<'_, PyAny>) -> PyResult<Py<WaiterPy>> {
        WaiterPy::enqueue(py, self.budget.clone(), self.cost, wake)
    }

    /// Takes the waiter's grant: the permit now holds the units.
    fn _finish(slf: &Bound<'_, Self>, waiter: &Bound<'_, WaiterPy>) -> PyResult<Py<Self>> {
        waiter.get().claim()?;
        slf.get().state.store(GRANTED, Ordering::Release);
        Ok(slf.clone().unbind())
    }

    /// The wait ended without a grant: the permit may be awaited again.
    fn _reset(&self) {
        let _ = self
            .state
            .compare_exchange(WAITING, PENDING, Ordering::AcqRel, Ordering::Acquire);
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

/// The result of `AtomicTokenBudget.reserve_tokens()`: awaiting it waits for the estimate and
/// returns an armed `TokenReservation`; as an async context manager it refunds an armed one on
/// exit.
#[pyclass(frozen, module = "costbound._native", name = "TokenRequest")]
pub(crate) struct TokenRequestPy {
    ledger: Arc<TokenLedger>,
    estimate: u64,
    timeout: Option<f64>,
    state: AtomicU8,
    reservation: Mutex<Option<Py<PyAny>>>,
}

impl TokenRequestPy {
    pub(crate) fn new(ledger: Arc<TokenLedger>, estimate: u64, timeout: Option<f64>) -> Self {
        Self {
            ledger,
            estimate,
            timeout,
            state: AtomicU8::new(PENDING),
            reservation: Mutex::new(None),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Py<PyAny>>> {
        self.reservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Issues the reservation for a granted `hold` and keeps it for the context manager.
    fn adopt(&self, py: Python<'_>, hold: Hold) -> PyResult<Py<PyAny>> {
        let reservation = issue_reservation(py, hold)?.unbind();
        *self.slot() = Some(reservation.clone_ref(py));
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
        block_for(py, "reserve_tokens_blocking", &**ledger, estimate, timeout)?;
        issue_reservation(py, Hold::adopt(ledger, estimate))
    }
}

impl FastAwait for TokenRequestPy {
    fn enter(slf: Borrowed<'_, '_, Self>) -> PyResult<Py<PyAny>> {
        let this = slf.get();
        let py = slf.py();
        enter_wait(slf, &this.state, this.timeout, || {
            match Hold::try_reserve(&this.ledger, this.estimate) {
                Some(hold) => {
                    let reservation = issue_reservation(py, hold)?.unbind();
                    *this.slot() = Some(reservation);
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    fn step(slf: Borrowed<'_, '_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        slf.get()
            .slot()
            .as_ref()
            .map(|r| r.clone_ref(py))
            .ok_or_else(|| PyRuntimeError::new_err("the token request holds no reservation"))
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
        Self::enter(slf.as_borrowed())
    }

    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Err(pyo3::exceptions::PyStopIteration::new_err((Self::step(
            slf.as_borrowed(),
        )?,)))
    }

    fn __aenter__(slf: &Bound<'_, Self>) -> Py<Self> {
        slf.clone().unbind()
    }

    /// Refunds the reservation if it is still armed (not recorded, not disarmed).
    fn __aexit__(
        &self,
        py: Python<'_>,
        _kind: &Bound<'_, PyAny>,
        _value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<Py<Awaitable>> {
        let reservation = self.slot().take();
        if let Some(reservation) = reservation {
            if let Ok(reservation) = reservation.bind(py).cast::<ReservationPy>() {
                reservation.get().refund_if_armed(py)?;
            }
        }
        Ok(Awaitable::none(py))
    }

    /// Queues this request (the suspended wait's first step).
    fn _enqueue(&self, py: Python<'_>, wake: &Bound<'_, PyAny>) -> PyResult<Py<WaiterPy>> {
        WaiterPy::enqueue(py, self.ledger.clone(), self.estimate, wake)
    }

    /// Takes the waiter's grant and returns the armed reservation that now holds it.
    fn _finish(&self, py: Python<'_>, waiter: &Bound<'_, WaiterPy>) -> PyResult<Py<PyAny>> {
        let estimate = waiter.get().claim()?;
        self.adopt(py, Hold::adopt(&self.ledger, estimate))
    }

    /// The wait ended without a grant: the request may be awaited again.
    fn _reset(&self) {
        let _ = self
            .state
            .compare_exchange(WAITING, PENDING, Ordering::AcqRel, Ordering::Acquire);
    }

    fn __repr__(&self) -> String {
        format!("<TokenRequest estimate={}>", self.estimate)
    }
}

/// A clock for tests of rate refill: it starts at zero and moves only by `advance()`, which
/// wakes the waiters of every budget made with it. `from costbound.testing import ManualClock`.
#[pyclass(frozen, module = "costbound._native", name = "ManualClock")]
pub(crate) struct ManualClockPy {
    clock: Arc<ManualClock>,
}

#[pymethods]
impl ManualClockPy {
    #[new]
    fn new() -> Self {
        Self {
            clock: Arc::new(ManualClock::new()),
        }
    }

    /// Seconds since the clock was made, as far as it has been advanced.
    #[getter]
    fn now(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // seconds for display and arithmetic in tests
        let now = self.clock.now_ns() as f64;
        now / 1e9
    }

    /// Nanoseconds since the clock was made.
    #[getter]
    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Moves the clock `seconds` forward (rounded to the nanosecond) and grants the waiters that
    /// the refill now fits.
    fn advance(&self, seconds: &Bound<'_, PyAny>) -> PyResult<()> {
        let seconds = to_seconds(seconds, "seconds")?;
        if seconds.is_infinite() {
            return Err(PyValueError::new_err("seconds must be finite"));
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // >= 0, saturating
        let nanos = (seconds * 1e9).round() as u64;
        self.clock.advance(nanos);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("ManualClock(now={})", self.now())
    }
}
