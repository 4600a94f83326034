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
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyNone};
use pyo3::{BoundObject, PyTraverseError};

use super::awaitable::{Awaitable, Delegate, FastAwait, Step, step_to_python, to_exception};
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

/// Reads a `timeout` argument: `None`, or a number of seconds `>= 0`; infinity is no timeout
/// (`None`), and NaN or a negative number a `ValueError`.
pub(crate) fn to_timeout(timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f64>> {
    match timeout.filter(|t| !t.is_none()) {
        None => Ok(None),
        Some(timeout) => Ok(Some(to_seconds(timeout, "timeout")?).filter(|t| t.is_finite())),
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

/// A core waiter for `cost` whose wake-up calls the Python callable `wake()` (from whichever
/// thread makes room, never under a lock); an exception it raises is reported as unraisable.
///
/// A wake-up that comes while the interpreter shuts down (a finaliser releasing units with a
/// task still queued on a loop never closed) is skipped: no Python code can run then, and
/// the task it would wake is gone. `Python::attach` would panic there instead.
fn python_waiter(cost: u64, wake: &Bound<'_, PyAny>) -> Arc<Waiter> {
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
    fn enqueue<O>(
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
    fn claim<O>(&self, owner: &O) -> PyResult<u64> {
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

/// `RuntimeError` for a permit or token request awaited or entered after it was used up.
fn used_up(what: &str, call: &str) -> PyErr {
    PyRuntimeError::new_err(format!(
        "this {what} was already used: a {what} is single-use (entered once, never again \
         after its exit); call {call}() for a new one"
    ))
}

/// Takes the single entry of a `with` / `async with` block.
fn enter_once(state: &AtomicU8, entered: &AtomicBool, what: &str, call: &str) -> PyResult<()> {
    if state.load(Ordering::Acquire) == RELEASED || entered.swap(true, Ordering::AcqRel) {
        return Err(used_up(what, call));
    }
    Ok(())
}

/// A wait that ended without a grant: the request may be awaited (and entered) again.
fn reset(state: &AtomicU8, entered: &AtomicBool) {
    if state
        .compare_exchange(WAITING, PENDING, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        entered.store(false, Ordering::Release);
    }
}

/// Starts the `await` of a permit or token request: the fast path, or the suspended wait in
/// `costbound._waiting`, whose iterator is returned.
fn enter_wait<'py, T: FastAwait>(
    slf: Borrowed<'_, 'py, T>,
    state: &AtomicU8,
    entered: &AtomicBool,
    timeout: Option<f64>,
    used: impl FnOnce() -> PyErr,
    try_now: impl FnOnce() -> PyResult<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = slf.py();
    match state.compare_exchange(PENDING, WAITING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(WAITING) => {
            return Err(PyRuntimeError::new_err(
                "this request is already being awaited",
            ));
        }
        Err(GRANTED) => return Ok(slf.to_owned().into_any()), // await returns at once
        Err(_) => return Err(used()),
    }
    match try_now() {
        Ok(true) => {
            state.store(GRANTED, Ordering::Release);
            return Ok(slf.to_owned().into_any());
        }
        Ok(false) => {}
        Err(err) => {
            reset(state, entered);
            return Err(err);
        }
    }
    if timeout == Some(0.0) {
        reset(state, entered);
        return Err(timed_out(0.0));
    }
    // `Bound`s only: this runs under a raw slot (see `awaitable`).
    let suspended = WAIT
        .get(py)
        .ok_or_else(|| PyRuntimeError::new_err("costbound._waiting was not imported"))
        .and_then(|wait| wait.bind(py).call1((slf.to_owned(), timeout)))
        .and_then(|coroutine| coroutine.call_method0(pyo3::intern!(py, "__await__")));
    if suspended.is_err() {
        reset(state, entered);
    }
    suspended
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
    fn enter<'py>(slf: Borrowed<'_, 'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        let py = slf.py();
        enter_wait(
            slf,
            &this.state,
            &this.entered,
            this.timeout,
            || used_up("token request", "reserve_tokens"),
            || match Hold::try_reserve(&this.ledger, this.estimate) {
                Some(hold) => {
                    let reservation = issue_reservation(py, hold)?.unbind();
                    *this.slot() = Some(reservation);
                    Ok(true)
                }
                None => Ok(false),
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
                if let Ok(reservation) = reservation.bind(py).cast::<ReservationPy>() {
                    reservation.get().refund_if_armed(py)?;
                }
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
        let estimate = waiter.get().claim(self)?;
        self.adopt(py, Hold::adopt(&self.ledger, estimate))
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
