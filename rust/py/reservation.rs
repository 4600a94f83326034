//! The native side of `costbound.TokenReservation` and its refunds.
//!
//! A reservation is an instance of `costbound.TokenReservation`, a Python subclass of
//! [`ReservationPy`] registered once at import. Its refund is either a native [`Hold`] (the
//! budget's ledger through a `Weak`, claimed once, pure atomics), a native budget's refund
//! handle wrapped again, or a Python callable.

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard, PoisonError};

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyTuple, PyType};
use pyo3::{PyTraverseError, PyTypeInfo};

use super::args::{to_u64, type_name};
use super::error::Error;
use super::panic_guard::catch_panic;
use crate::core::Hold;

/// The native base of `costbound.TokenReservation`: an estimate and its single-use refund.
///
/// No lock here is ever held across a call into Python: a refund is taken out of its slot
/// first and called after, and a native hold needs no lock at all (its atomic claim decides who
/// wins when threads record, disarm or drop one reservation at once).
#[pyclass(frozen, subclass, module = "costbound._native", name = "Reservation")]
pub(crate) struct ReservationPy {
    estimate: u64,
    refund: Refund,
}

enum Refund {
    /// Issued by a native budget: the claim on its ledger.
    Native(Hold),
    /// A native budget's refund handle wrapped again (`TokenReservation(n, r.disarm())`): the
    /// reservation shares the handle's claim, so it is recorded, disarmed or refunded natively.
    Handle(Py<NativeRefundPy>),
    /// Given by Python code (a custom backend); `None` once taken.
    Python(Mutex<Option<Py<PyAny>>>),
}

fn lock<T>(slot: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while the lock is held, but a poisoned slot is still a valid slot.
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ReservationPy {
    /// The native claim behind the reservation, if its refund is a native one.
    pub(crate) fn hold(&self) -> Option<&Hold> {
        match &self.refund {
            Refund::Native(hold) => Some(hold),
            Refund::Handle(handle) => Some(&handle.get().hold),
            Refund::Python(_) => None,
        }
    }

    /// Takes a Python refund out of its slot (the lock is released before the caller uses it).
    fn take_python_refund(&self) -> Option<Py<PyAny>> {
        match &self.refund {
            Refund::Python(slot) => lock(slot).take(),
            Refund::Native(_) | Refund::Handle(_) => None,
        }
    }
}

#[pymethods]
impl ReservationPy {
    #[new]
    fn new(
        py: Python<'_>,
        estimate: &Bound<'_, PyAny>,
        refund: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        if ISSUING_MARKER
            .get(py)
            .is_some_and(|marker| refund.is(marker))
        {
            if let Some(hold) = ISSUING.with(Cell::take) {
                return Ok(Self {
                    estimate: hold.estimate(),
                    refund: Refund::Native(hold),
                });
            }
        }
        let estimate = to_u64(estimate, "estimate", u64::MAX)?;
        if let Ok(handle) = refund.cast::<NativeRefundPy>() {
            return Ok(Self {
                estimate,
                refund: Refund::Handle(handle.clone().unbind()),
            });
        }
        if !refund.is_callable() {
            return Err(Error::NotCallable {
                name: "refund",
                type_name: type_name(refund),
            }
            .into());
        }
        Ok(Self {
            estimate,
            refund: Refund::Python(Mutex::new(Some(refund.clone().unbind()))),
        })
    }

    /// The number of tokens reserved.
    #[getter]
    fn estimate(&self) -> u64 {
        self.estimate
    }

    /// `False` once the reservation was recorded, disarmed or refunded.
    #[getter]
    pub(crate) fn armed(&self) -> bool {
        match &self.refund {
            Refund::Python(slot) => lock(slot).is_some(),
            Refund::Native(_) | Refund::Handle(_) => self.hold().is_some_and(Hold::is_armed),
        }
    }

    /// Takes the refund away and returns it (`None` if already disarmed): the reservation will
    /// not refund itself when dropped, and the caller now owns the refund.
    fn disarm(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let Some(hold) = self.hold() else {
            return Ok(self.take_python_refund());
        };
        if !hold.is_armed() {
            return Ok(None);
        }
        // The handle is allocated before the claim moves into it, so that a failed allocation
        // leaves the reservation armed instead of losing its hold.
        let handle = Py::new(
            py,
            NativeRefundPy {
                hold: hold.vessel(),
            },
        )?;
        Ok(hold
            .hand_over(&handle.get().hold)
            .then(|| handle.into_any()))
    }

    /// Calls the refund with the estimate if the reservation is still armed: the finaliser of
    /// `TokenReservation`, which Python runs when the last reference goes or a cycle is collected.
    /// A refund that raises propagates to the interpreter, which reports it as unraisable.
    #[pyo3(name = "__del__")]
    pub(crate) fn refund_if_armed(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(hold) = self.hold() {
            hold.refund();
        } else if let Some(refund) = self.take_python_refund() {
            refund.call1(py, (self.estimate,))?;
        }
        Ok(())
    }

    fn __enter__(slf: &Bound<'_, Self>) -> Py<Self> {
        slf.clone().unbind()
    }

    /// Leaving a `with` block refunds the reservation if it is still armed.
    fn __exit__(
        &self,
        py: Python<'_>,
        _kind: &Bound<'_, PyAny>,
        _value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.refund_if_armed(py)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Refund::Python(slot) = &self.refund {
            // The lock is never held across a call into Python, so it is free during a
            // collection; skipping a visit would only keep an object alive longer.
            if let Ok(refund) = slot.try_lock() {
                visit.call(&*refund)?;
            }
        }
        // A `Handle` refers to no Python object beyond itself, so it cannot close a cycle.
        Ok(())
    }

    /// Breaks a reference cycle. The refund was called before, by the finaliser (`__del__` of
    /// `TokenReservation`, [`finalize_reservation`] of the base), which the collector runs on
    /// every object of a cycle before it clears any; calling Python code here instead could
    /// run into objects of the cycle that are already cleared.
    fn __clear__(&self) {
        let refund = self.take_python_refund();
        drop(refund); // after the lock is released: a decref can run arbitrary code
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let this = slf.get();
        Ok(format!(
            "{}(estimate={}, armed={})",
            slf.get_type().qualname()?,
            this.estimate,
            if this.armed() { "True" } else { "False" }
        ))
    }
}

impl ReservationPy {
    /// Refunds an armed reservation that is being destroyed, once: a native hold by atomics, a
    /// Python refund by calling it with the estimate (see [`call_dropped_refund`]).
    fn refund_dropped(&self, py: Python<'_>) {
        if let Some(hold) = self.hold() {
            hold.refund();
        } else if let Some(refund) = self.take_python_refund() {
            call_dropped_refund(refund.into_bound(py), self.estimate);
        }
    }
}

impl Drop for ReservationPy {
    /// Dropping an armed reservation refunds it, once. For `TokenReservation` this is a backstop
    /// (its `__del__` refunds first); a base `Reservation` dropped by its reference count is
    /// refunded here, from `tp_dealloc`, where the interpreter is attached (a cycle's members
    /// are refunded earlier, by [`finalize_reservation`]).
    fn drop(&mut self) {
        if let Some(hold) = self.hold() {
            hold.refund();
        } else if let Some(refund) = self.take_python_refund() {
            // Attached whenever CPython deallocates; if not (a drop outside the interpreter),
            // the refund cannot run and PyO3 releases it later.
            let _ =
                Python::try_attach(|py| call_dropped_refund(refund.into_bound(py), self.estimate));
        }
    }
}

/// The `tp_finalize` slot of the base `Reservation` (PyO3 has no way to declare `__del__`): the
/// collector calls it on every object of an unreachable cycle before it clears any of them, so
/// the refund still finds everything it refers to intact. `TokenReservation` has its own
/// `__del__`; Python subclasses without one inherit this slot.
unsafe extern "C" fn finalize_reservation(object: *mut pyo3::ffi::PyObject) {
    // SAFETY: CPython calls `tp_finalize` with the thread attached.
    let py = unsafe { Python::assume_attached() };
    let finalized = catch_panic(|| {
        // SAFETY: `object` is alive for the whole call (CPython holds it).
        let object = unsafe { Borrowed::from_ptr(py, object) };
        if let Ok(reservation) = object.cast::<ReservationPy>() {
            reservation.get().refund_dropped(py);
        }
        Ok(())
    });
    if let Err(panic) = finalized {
        // A panic must not unwind into CPython; there is no caller to raise to.
        let pending = PendingException::set_aside(py);
        panic.write_unraisable(py, None);
        pending.restore(py);
    }
}

/// Gives the base `Reservation` its finaliser, once, before any instance can be made (the
/// package registers its reservation type on import, before user code runs).
fn install_reservation_finalizer(py: Python<'_>) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let kind = ReservationPy::type_object(py);
        // SAFETY: a heap type PyO3 made, alive for the interpreter's life; `tp_finalize` is read
        // by the collector and by `tp_dealloc` of subclasses, and nothing reads it before the
        // first instance exists.
        unsafe { (*kind.as_type_ptr()).tp_finalize = Some(finalize_reservation) };
    });
}

/// Calls a dropped reservation's Python refund with its estimate, as CPython runs a `__del__`:
/// an exception already being raised is set aside and restored, and one the refund raises is
/// reported as unraisable (it has nowhere to propagate). Only `Bound`s are dropped here, which
/// release their references at once: `tp_finalize` is entered without PyO3's bookkeeping, where
/// a dropped `Py` would be deferred to PyO3's locked pool.
fn call_dropped_refund(refund: Bound<'_, PyAny>, estimate: u64) {
    let py = refund.py();
    let pending = PendingException::set_aside(py);
    if let Err(err) = refund.call1((estimate,)) {
        err.write_unraisable(py, Some(&refund));
    }
    pending.restore(py);
}

/// The exception being raised when a reservation is dropped (a deallocation can happen while
/// one propagates), kept aside while the refund runs, as CPython does around a `__del__`. Raw,
/// because PyO3's `PyErr::take` would resume a pending Rust panic here instead of keeping it.
struct PendingException([*mut pyo3::ffi::PyObject; 3]);

// `PyErr_Fetch` and `PyErr_Restore` are deprecated from 3.12 on, not removed, and exist on every
// Python this crate builds for; their replacements do not exist before 3.12.
#[allow(deprecated)]
impl PendingException {
    fn set_aside(_py: Python<'_>) -> Self {
        let mut parts = [std::ptr::null_mut(); 3];
        let [kind, value, traceback] = &mut parts;
        // SAFETY: attached (a `Python` token is held); the three references become ours.
        unsafe { pyo3::ffi::PyErr_Fetch(kind, value, traceback) };
        Self(parts)
    }

    fn restore(self, _py: Python<'_>) {
        let [kind, value, traceback] = self.0;
        // SAFETY: attached; gives the references taken by `set_aside` back to the interpreter.
        // With none set aside this leaves no exception set (the refund's own was reported).
        unsafe { pyo3::ffi::PyErr_Restore(kind, value, traceback) };
    }
}

/// The refund a native budget's reservation gives up on `disarm()`: a single-use callable that
/// returns the whole hold to the budget's ledger through a `Weak` (nothing if the budget is gone).
#[pyclass(frozen, module = "costbound._native", name = "NativeRefund")]
pub(crate) struct NativeRefundPy {
    hold: Hold,
}

#[pymethods]
impl NativeRefundPy {
    /// Gives the whole hold back the first time, whatever `amount` it is called with (an int
    /// `>= 0`: a reservation wrapping it may call it with its own estimate); later calls do
    /// nothing. A bad `amount` raises and gives nothing back yet.
    fn __call__(&self, amount: &Bound<'_, PyAny>) -> PyResult<()> {
        // Checked, then ignored: a part of a hold given back would lose the rest for good.
        to_u64(amount, "amount", u64::MAX)?;
        self.hold.refund();
        Ok(())
    }

    /// The estimate this refund gives back.
    #[getter]
    fn estimate(&self) -> u64 {
        self.hold.estimate()
    }

    /// Whether calling it would still refund.
    #[getter]
    pub(crate) fn armed(&self) -> bool {
        self.hold.is_armed()
    }

    fn __repr__(&self) -> String {
        format!(
            "NativeRefund(estimate={}, armed={})",
            self.hold.estimate(),
            if self.hold.is_armed() {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// Marks a `Reservation.__new__` call made by [`issue_reservation`]; never exposed.
#[pyclass(frozen)]
struct IssuingMarker;

static ISSUING_MARKER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static ISSUING_ARGS: PyOnceLock<Py<PyTuple>> = PyOnceLock::new();
static RESERVATION_TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();

thread_local! {
    /// The hold that the `Reservation.__new__` call in progress on this thread adopts.
    static ISSUING: Cell<Option<Hold>> = const { Cell::new(None) };
}

/// The cached arguments of an issuing `Reservation.__new__` call: the marker, twice.
fn issuing_args(py: Python<'_>) -> PyResult<&Bound<'_, PyTuple>> {
    if let Some(args) = ISSUING_ARGS.get(py) {
        return Ok(args.bind(py)); // the path every issue takes: one check
    }
    let marker =
        ISSUING_MARKER.get_or_try_init(py, || Py::new(py, IssuingMarker).map(Py::into_any))?;
    let args = ISSUING_ARGS
        .get_or_try_init(py, || PyTuple::new(py, [marker, marker]).map(Bound::unbind))?;
    Ok(args.bind(py))
}

/// Wraps a granted hold in a `TokenReservation` without running any Python code: the hold is
/// passed to `Reservation.__new__` through a thread-local, and the constructor is called with
/// cached arguments, so issuing allocates nothing but the reservation itself. On any error the
/// hold's estimate goes back to the budget.
pub(crate) fn issue_reservation(py: Python<'_>, hold: Hold) -> PyResult<Bound<'_, PyAny>> {
    let kind = RESERVATION_TYPE
        .get(py)
        .map_or_else(|| ReservationPy::type_object(py), |t| t.bind(py).clone());
    let kind_ptr = kind.as_type_ptr();
    // SAFETY: `kind_ptr` is a live type object (`kind` holds it).
    let new = unsafe { (*kind_ptr).tp_new }.ok_or_else(|| {
        pyo3::exceptions::PyTypeError::new_err("the reservation type cannot be instantiated")
    });
    let (new, args) = match new.and_then(|new| Ok((new, issuing_args(py)?))) {
        Ok(found) => found,
        Err(err) => {
            hold.refund();
            return Err(err);
        }
    };
    if let Some(stale) = ISSUING.with(|cell| cell.replace(Some(hold))) {
        stale.refund(); // unreachable in practice: every issue takes its own hold back
    }
    // SAFETY: `kind` is `Reservation` or a registered subclass of it, whose `tp_new` is the
    // one PyO3 generated for `Reservation`; `args` is a valid tuple and no kwargs are passed.
    let issued = unsafe {
        Bound::from_owned_ptr_or_err(py, new(kind_ptr, args.as_ptr(), std::ptr::null_mut()))
    };
    // If `__new__` failed before adopting the hold, its estimate goes back at once.
    if let Some(hold) = ISSUING.with(Cell::take) {
        hold.refund();
    }
    issued
}

/// Makes the native budgets issue instances of `cls` (`costbound.TokenReservation`), a
/// subclass of `Reservation`. The first registration stays in force. Called on import, it also
/// gives the base `Reservation` its finaliser.
#[pyfunction]
pub(crate) fn register_reservation_type(cls: &Bound<'_, PyType>) -> PyResult<()> {
    install_reservation_finalizer(cls.py());
    if !cls.is_subclass_of::<ReservationPy>()? {
        return Err(Error::WrongType {
            name: "cls",
            expected: "a subclass of Reservation",
            type_name: cls.qualname()?.to_string(),
        }
        .into());
    }
    let _ = RESERVATION_TYPE.set(cls.py(), cls.clone().unbind());
    Ok(())
}
