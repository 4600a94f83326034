//! The coroutine protocol of the native awaitables, and the raw slots `await` enters them by.
//!
//! An awaitable here ([`FastAwait`]) is both: `await` enters it through `am_await` /
//! `am_send` / `tp_iternext` with no Python frame, and asyncio's tasks drive it as a coroutine
//! (`send`, `throw`, `close`). One that must suspend hands its steps to the wait it started
//! ([`Delegate`]). Nothing here knows the budgets or the requests that implement it.

use std::sync::{Mutex, MutexGuard, PoisonError};

use pyo3::exceptions::{PyBaseException, PyRuntimeError, PyStopIteration, PyTypeError};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyNone, PyTuple, PyType};
use pyo3::{BoundObject, PyClass, PyTraverseError, PyTypeInfo, ffi, intern};

use super::panic_guard::catch_panic;

/// What one step of a coroutine gives: a value for the event loop (a future to wait on), or
/// the coroutine's result.
pub(crate) enum Step<'py> {
    /// Suspended: the value yielded (by the wait it hands over to).
    Yield(Bound<'py, PyAny>),
    /// Finished with this result.
    Return(Bound<'py, PyAny>),
}

/// An object whose `await` the interpreter enters through raw slots ([`install_fast_slots`]),
/// and which is also a coroutine of its own, so that asyncio's tasks (`create_task`,
/// `ensure_future`, `asyncio.run`) accept it: the budgets' awaitables
/// ([`super::awaitable`]), and the permits and token requests of [`super::wait`].
pub(crate) trait FastAwait:
    PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + PyTypeInfo + Sync
{
    /// `am_await`: the iterator that `await` drives; the object itself when it is already done.
    fn enter<'py>(slf: Borrowed<'_, 'py, Self>) -> PyResult<Bound<'py, PyAny>>;

    /// The result, once [`enter`](Self::enter) returned the object itself.
    fn step<'py>(slf: Borrowed<'_, 'py, Self>) -> PyResult<Bound<'py, PyAny>>;

    /// One step of the object driven as its own coroutine (`send`, `am_send`, `next`), with
    /// `value` sent in. By default it is done in one step.
    fn resume<'py>(
        slf: Borrowed<'_, 'py, Self>,
        value: Borrowed<'_, 'py, PyAny>,
    ) -> PyResult<Step<'py>> {
        let _ = value; // nothing to send into: it completes in one step
        Self::step(slf).map(Step::Return)
    }

    /// `coroutine.throw`: the exception goes to the wait in progress, if any; otherwise it
    /// propagates as is and nothing is started.
    fn throw<'py>(
        slf: Borrowed<'_, 'py, Self>,
        exception: Bound<'py, PyAny>,
    ) -> PyResult<Step<'py>> {
        let _ = slf;
        Err(PyErr::from_value(exception))
    }

    /// `coroutine.close`: ends the wait in progress, if any (which then takes nothing).
    fn close(slf: Borrowed<'_, '_, Self>) -> PyResult<()> {
        let _ = slf;
        Ok(())
    }
}

/// The wait a suspended object hands its steps to while it is driven as its own coroutine (by
/// asyncio's task): what [`FastAwait::enter`] returned when it had to suspend. Empty otherwise,
/// and on the path that does not suspend it is never touched.
///
/// The lock only guards the slot: it is never held across a call into Python.
pub(crate) struct Delegate(Mutex<Option<Wait>>);

/// The wait a [`Delegate`] hands its steps to, and what it last yielded.
struct Wait {
    iterator: Py<PyAny>,
    /// The future the wait last yielded to the task driving it: a step sent in while it is not
    /// done comes from another driver (a second task handed the same request).
    yielded: Option<Py<PyAny>>,
}

impl Delegate {
    /// An empty slot.
    pub(crate) const fn new() -> Self {
        Self(Mutex::new(None))
    }

    fn slot(&self) -> MutexGuard<'_, Option<Wait>> {
        // Nothing panics with the lock held, but a poisoned slot is still a valid slot.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current<'py>(
        &self,
        py: Python<'py>,
    ) -> Option<(Bound<'py, PyAny>, Option<Bound<'py, PyAny>>)> {
        self.slot().as_ref().map(|wait| {
            (
                wait.iterator.bind(py).clone(),
                wait.yielded.as_ref().map(|f| f.bind(py).clone()),
            )
        })
    }

    /// Records what a step gave: the future yielded, or (once the wait has finished, returned
    /// or raised) an empty slot. What is replaced is dropped as a `Bound`, at once and outside
    /// the lock, since a raw slot may be running this.
    fn settle<'py>(&self, py: Python<'py>, step: PyResult<Step<'py>>) -> PyResult<Step<'py>> {
        let mut slot = self.slot();
        let replaced = match &step {
            Ok(Step::Yield(future)) => slot
                .as_mut()
                .and_then(|wait| wait.yielded.replace(future.clone().unbind()))
                .map(|old| (old, None)),
            _ => slot.take().map(|wait| (wait.iterator, wait.yielded)),
        };
        drop(slot);
        if let Some((first, second)) = replaced {
            drop(first.into_bound(py));
            drop(second.map(|second| second.into_bound(py)));
        }
        step
    }

    /// One step of `owner` driven as a coroutine: the first runs `enter` (finishing at once
    /// when it returns the object itself), later ones go to the wait it handed over to.
    pub(crate) fn resume<'py, T: FastAwait>(
        &self,
        owner: Borrowed<'_, 'py, T>,
        value: Borrowed<'_, 'py, PyAny>,
    ) -> PyResult<Step<'py>> {
        let py = owner.py();
        if let Some((iterator, yielded)) = self.current(py) {
            if let Some(future) = yielded {
                // The task driving the wait steps it only once the future it waits on is done
                // (or throws in a cancellation); a step before that is another driver's.
                if !future.call_method0(intern!(py, "done"))?.is_truthy()? {
                    return Err(PyRuntimeError::new_err(
                        "this request is already being awaited (by another task)",
                    ));
                }
            }
            return self.settle(py, send(&iterator, value));
        }
        if !value.is_none() {
            // Refused before anything starts, as a coroutine refuses it: sent on, it would
            // reach a wait that never ran (left "being awaited" for ever, and never awaited).
            return Err(PyTypeError::new_err(
                "can't send non-None value to a just-started coroutine",
            ));
        }
        let iterator = T::enter(owner)?;
        if iterator.is(&*owner) {
            return T::step(owner).map(Step::Return);
        }
        *self.slot() = Some(Wait {
            iterator: iterator.clone().unbind(),
            yielded: None,
        });
        self.settle(py, send(&iterator, value))
    }

    /// `throw` into the wait in progress; without one the exception propagates as is.
    pub(crate) fn throw<'py>(
        &self,
        py: Python<'py>,
        exception: Bound<'py, PyAny>,
    ) -> PyResult<Step<'py>> {
        let Some((iterator, _)) = self.current(py) else {
            return Err(PyErr::from_value(exception));
        };
        let step = match iterator.call_method1(intern!(py, "throw"), (exception,)) {
            Ok(yielded) => Ok(Step::Yield(yielded)),
            Err(err) if err.is_instance_of::<PyStopIteration>(py) => {
                Ok(Step::Return(err.value(py).getattr(intern!(py, "value"))?))
            }
            Err(err) => Err(err),
        };
        self.settle(py, step)
    }

    /// Closes the wait in progress, if any: its clean-up leaves the queue and takes nothing.
    pub(crate) fn close(&self, py: Python<'_>) -> PyResult<()> {
        let wait = self.slot().take();
        match wait {
            Some(wait) => {
                drop(wait.yielded.map(|future| future.into_bound(py)));
                let iterator = wait.iterator.into_bound(py);
                iterator.call_method0(intern!(py, "close")).map(drop)
            }
            None => Ok(()),
        }
    }

    /// Visits the wait held (for the garbage collector: it refers back to its owner).
    pub(crate) fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        // The lock is never held across a call into Python, so it is free during a collection;
        // skipping a visit would only keep an object alive longer.
        if let Ok(slot) = self.0.try_lock() {
            if let Some(wait) = slot.as_ref() {
                visit.call(&wait.iterator)?;
                visit.call(&wait.yielded)?;
            }
        }
        Ok(())
    }

    /// Drops the wait held (the garbage collector breaking a cycle).
    pub(crate) fn clear(&self) {
        let wait = self.slot().take();
        drop(wait);
    }
}

/// `PyIter_Send`: one step of `iterator` with `value` sent in.
fn send<'py>(iterator: &Bound<'py, PyAny>, value: Borrowed<'_, 'py, PyAny>) -> PyResult<Step<'py>> {
    let py = iterator.py();
    let mut result = std::ptr::null_mut();
    // SAFETY: attached; `iterator` and `value` are live, `result` is a valid place to write.
    let status = unsafe { ffi::PyIter_Send(iterator.as_ptr(), value.as_ptr(), &raw mut result) };
    // SAFETY: on NEXT and RETURN `result` is a new reference; on ERROR it is NULL.
    match status {
        ffi::PySendResult::PYGEN_NEXT => {
            Ok(Step::Yield(unsafe { Bound::from_owned_ptr(py, result) }))
        }
        ffi::PySendResult::PYGEN_RETURN => {
            Ok(Step::Return(unsafe { Bound::from_owned_ptr(py, result) }))
        }
        ffi::PySendResult::PYGEN_ERROR => Err(PyErr::fetch(py)),
    }
}

/// The exception `throw(exception, value, traceback)` raises, built as `generator.throw` does:
/// an exception instance, or an exception class instantiated with `value`. Anything else is a
/// `TypeError`, raised before the caller changes any state.
pub(crate) fn to_exception<'py>(
    exception: &Bound<'py, PyAny>,
    value: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    if exception.is_instance_of::<PyBaseException>() {
        return Ok(exception.clone());
    }
    let is_class = exception
        .cast::<PyType>()
        .is_ok_and(|kind| kind.is_subclass_of::<PyBaseException>().unwrap_or(false));
    if !is_class {
        return Err(PyTypeError::new_err(format!(
            "exceptions must be classes or instances deriving from BaseException, not {}",
            crate::py::args::type_name(exception)
        )));
    }
    let made = match value {
        Some(value) if value.is_instance_of::<PyBaseException>() => return Ok(value.clone()),
        Some(value) => exception.call1((value,))?,
        None => exception.call0()?,
    };
    if made.is_instance_of::<PyBaseException>() {
        Ok(made)
    } else {
        Err(PyTypeError::new_err(
            "the exception class thrown in made something that is not an exception",
        ))
    }
}

/// What a step means to a Python-level method (`send`, `throw`, `__next__`): a yielded value is
/// returned, a result raises `StopIteration(result)`.
pub(crate) fn step_to_python(step: PyResult<Step<'_>>) -> PyResult<Py<PyAny>> {
    match step? {
        Step::Yield(value) => Ok(value.unbind()),
        Step::Return(value) => Err(PyStopIteration::new_err((value.unbind(),))),
    }
}

/// Replaces three slots of `T`'s type with direct C entry points, so that `await` costs no
/// Python frame, no argument parsing and, where the interpreter asks for it, no exception:
///
/// * `am_await` calls [`FastAwait::enter`] (for an awaitable that never suspends: the object
///   itself);
/// * `am_send` (`PyIter_Send`: the `await` of Python 3.10 and 3.11, and asyncio's tasks on
///   every version) calls [`FastAwait::resume`] and hands a result back as `PYGEN_RETURN`,
///   with no `StopIteration`;
/// * `tp_iternext` (the `await` of Python 3.12 and later) finishes a `None` result by returning
///   `NULL` with no exception set, which the interpreter reads as `StopIteration(None)`, and
///   raises `StopIteration(value)` only for other values.
///
/// Each runs its body under [`catch_panic`]: a panic is raised as `PanicException`, never
/// unwound into the interpreter. The Python-level `__await__`, `__next__` and `send` methods
/// stay PyO3's; only the slots the interpreter calls directly change. Called once per type,
/// from the module's initialisation.
pub(crate) fn install_fast_slots<T: FastAwait>(py: Python<'_>) -> PyResult<()> {
    let kind = T::type_object_raw(py);
    // SAFETY: `kind` is the heap type PyO3 created for `T`; because the class defines
    // `__await__`, its `tp_as_async` points at the type's own `PyAsyncMethods`. Nothing has
    // used the type yet, and `PyType_Modified` drops any cached lookups.
    unsafe {
        let async_methods = (*kind).tp_as_async;
        if async_methods.is_null() {
            return Err(PyRuntimeError::new_err(
                "costbound: an awaitable type has no async slots",
            ));
        }
        (*async_methods).am_await = Some(await_slot::<T>);
        (*async_methods).am_send = Some(send_slot::<T>);
        (*kind).tp_iternext = Some(iternext_slot::<T>);
        ffi::PyType_Modified(kind);
    }
    Ok(())
}

/// The `T` behind a pointer the interpreter passes to a slot.
///
/// # Safety
/// `slf` must point to a live `T`, and the calling thread must be attached.
unsafe fn this<T: FastAwait>(py: Python<'_>, slf: *mut ffi::PyObject) -> Borrowed<'_, '_, T> {
    // SAFETY: guaranteed by the caller; the slots belong to `T`'s type only.
    // Borrowed: the interpreter holds the reference for the call, so none is taken here.
    unsafe { Borrowed::from_ptr(py, slf).cast_unchecked() }
}

// The slots below run with the thread attached by the interpreter, but PyO3 does not count it
// as attached (`Python::assume_attached`), so everything they drop is a `Bound` (dropped at
// once) and never a `Py` (which PyO3 would defer through its locked reference pool).

unsafe extern "C" fn await_slot<T: FastAwait>(slf: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls slots attached, with a live `T`.
    unsafe {
        let py = Python::assume_attached();
        match catch_panic(|| T::enter(this::<T>(py, slf))) {
            Ok(iterator) => iterator.into_ptr(),
            Err(err) => {
                err.restore(py);
                std::ptr::null_mut()
            }
        }
    }
}

unsafe extern "C" fn send_slot<T: FastAwait>(
    slf: *mut ffi::PyObject,
    value: *mut ffi::PyObject,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    // SAFETY: the interpreter calls slots attached, with a live `T`, a live `value` and a
    // valid `result`.
    unsafe {
        let py = Python::assume_attached();
        let value =
            Borrowed::from_ptr_or_opt(py, value).unwrap_or_else(|| PyNone::get(py).into_any());
        match catch_panic(|| T::resume(this::<T>(py, slf), value)) {
            Ok(Step::Return(value)) => {
                *result = value.into_ptr();
                ffi::PySendResult::PYGEN_RETURN
            }
            Ok(Step::Yield(value)) => {
                *result = value.into_ptr();
                ffi::PySendResult::PYGEN_NEXT
            }
            Err(err) => {
                err.restore(py);
                *result = std::ptr::null_mut();
                ffi::PySendResult::PYGEN_ERROR
            }
        }
    }
}

unsafe extern "C" fn iternext_slot<T: FastAwait>(slf: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls slots attached, with a live `T`.
    unsafe {
        let py = Python::assume_attached();
        let none = PyNone::get(py).into_any();
        match catch_panic(|| T::resume(this::<T>(py, slf), none)) {
            Ok(Step::Yield(value)) => return value.into_ptr(),
            Ok(Step::Return(value)) if value.is_none() => {}
            Ok(Step::Return(value)) => finish_with(&value),
            Err(err) => err.restore(py),
        }
        std::ptr::null_mut()
    }
}

/// Raises `StopIteration(value)`, the iterator protocol's way of returning `value`.
fn finish_with(value: &Bound<'_, PyAny>) {
    let py = value.py();
    // A tuple or an exception given to `PyErr_SetObject` would be taken apart as arguments,
    // so those (never a budget's result, but cheap to get right) are wrapped first.
    if value.is_instance_of::<PyTuple>() || value.is_instance_of::<PyBaseException>() {
        match PyStopIteration::type_object(py).call1((value,)) {
            Ok(stop) => PyErr::from_value(stop).restore(py),
            Err(err) => err.restore(py),
        }
    } else {
        // SAFETY: attached; both pointers are live for the call.
        unsafe { ffi::PyErr_SetObject(ffi::PyExc_StopIteration, value.as_ptr()) };
    }
}
