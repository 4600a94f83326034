//! The awaitables the async methods return: no event-loop turn, no Python frame.

use pyo3::exceptions::{PyBaseException, PyRuntimeError, PyStopIteration};
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyTuple};
use pyo3::{PyClass, PyTypeInfo, ffi};

use super::token::AtomicTokenBudgetPy;
use super::unit::AtomicBudgetPy;

/// What an async budget method returns. Awaiting it never suspends, so it works on every event
/// loop (and with `yield from` on Python 3.10 and 3.11). It has the whole coroutine interface
/// (`send`, `throw`, `close`), and the Python package registers it as a
/// `collections.abc.Coroutine`, so `asyncio.create_task` accepts it too.
#[pyclass(frozen, module = "costbound._native", name = "Awaitable")]
pub(crate) struct Awaitable {
    outcome: Outcome,
}

enum Outcome {
    /// Decided when the method was called (a release, a recording): any number of awaits
    /// return the value. Those for `True`, `False` and `None` are shared.
    Ready(Py<PyAny>),
    /// A grant, made on the first step as a coroutine would make it: an awaitable that is
    /// never awaited, or a task cancelled before it starts, takes nothing.
    Deferred { started: AtomicBool, grant: Grant },
}

/// Claims the single step: `true` for the first caller only. Every caller holds the GIL on a
/// build that has one, so a plain load and store cannot interleave there and spare a locked
/// instruction on the hot path; the free-threaded build swaps atomically.
fn claim(started: &AtomicBool) -> bool {
    #[cfg(Py_GIL_DISABLED)]
    {
        !started.swap(true, Ordering::AcqRel)
    }
    #[cfg(not(Py_GIL_DISABLED))]
    {
        if started.load(Ordering::Relaxed) {
            return false;
        }
        started.store(true, Ordering::Relaxed);
        true
    }
}

/// A reservation to attempt on the first step.
pub(crate) enum Grant {
    Units(Py<AtomicBudgetPy>, u64),
    Tokens(Py<AtomicTokenBudgetPy>, u64),
}

static READY_NONE: PyOnceLock<Py<Awaitable>> = PyOnceLock::new();

impl Awaitable {
    /// A completed awaitable for `value`.
    pub(crate) fn ready(py: Python<'_>, value: Py<PyAny>) -> PyResult<Py<Self>> {
        Py::new(
            py,
            Self {
                outcome: Outcome::Ready(value),
            },
        )
    }

    /// The shared completed awaitable for `None`.
    pub(crate) fn none(py: Python<'_>) -> Py<Self> {
        READY_NONE
            .get_or_init(py, || {
                Self::ready(py, py.None()).expect("allocating the shared awaitable")
            })
            .clone_ref(py)
    }

    /// An awaitable that attempts `grant` when first stepped.
    pub(crate) fn deferred(py: Python<'_>, grant: Grant) -> PyResult<Py<Self>> {
        Py::new(
            py,
            Self {
                outcome: Outcome::Deferred {
                    started: AtomicBool::new(false),
                    grant,
                },
            },
        )
    }

    /// The value of the first (and only) step.
    fn step(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match &self.outcome {
            Outcome::Ready(value) => Ok(value.clone_ref(py)),
            Outcome::Deferred { started, grant } => {
                if !claim(started) {
                    return Err(PyRuntimeError::new_err(
                        "cannot reuse an already awaited budget call",
                    ));
                }
                match grant {
                    Grant::Units(budget, cost) => {
                        let granted = budget.get().reserve_units(*cost);
                        Ok(PyBool::new(py, granted).to_owned().into_any().unbind())
                    }
                    Grant::Tokens(budget, estimate) => Ok(budget
                        .get()
                        .grant_tokens(py, *estimate)?
                        .map_or_else(|| py.None(), Bound::unbind)),
                }
            }
        }
    }

    /// Marks a deferred grant as never to be made.
    fn abandon(&self) {
        if let Outcome::Deferred { started, .. } = &self.outcome {
            started.store(true, Ordering::Release);
        }
    }
}

#[pymethods]
impl Awaitable {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// The first step finishes: `StopIteration(value)`.
    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Err(PyStopIteration::new_err((self.step(py)?,)))
    }

    /// `send` as a generator has it: the same single step as `__next__`.
    fn send(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = value; // nothing to send into: the call completes in one step
        self.__next__(py)
    }

    /// An exception thrown in (a task cancelled before its first step) propagates as is, and a
    /// deferred grant is then never made.
    #[pyo3(signature = (exception, value = None, traceback = None))]
    fn throw(
        &self,
        exception: &Bound<'_, PyAny>,
        value: Option<&Bound<'_, PyAny>>,
        traceback: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let _ = traceback; // the legacy third argument of `generator.throw`
        self.abandon();
        if exception.is_instance_of::<PyBaseException>() {
            return Err(PyErr::from_value(exception.clone()));
        }
        let raised = match value {
            Some(value) => exception.call1((value,))?,
            None => exception.call0()?,
        };
        Err(PyErr::from_value(raised))
    }

    /// Closes the awaitable: a deferred grant not yet made is never made.
    fn close(&self) {
        self.abandon();
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        match &self.outcome {
            Outcome::Ready(value) => format!(
                "<costbound awaitable: {}>",
                value
                    .bind(py)
                    .repr()
                    .map_or_else(|_| "?".into(), |r| r.to_string())
            ),
            Outcome::Deferred { .. } => {
                "<costbound awaitable: a reservation, made when awaited>".into()
            }
        }
    }
}

/// An object whose `await` the interpreter enters through raw slots: [`Awaitable`], and the
/// permits and token requests of [`super::wait`].
pub(crate) trait FastAwait:
    PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + PyTypeInfo + Sync
{
    /// `am_await`: the iterator that `await` drives (often the object itself).
    fn enter(slf: Borrowed<'_, '_, Self>) -> PyResult<Py<PyAny>>;
    /// One step of that iterator when it is the object itself: the value it returns.
    fn step(slf: Borrowed<'_, '_, Self>) -> PyResult<Py<PyAny>>;
}

impl FastAwait for Awaitable {
    fn enter(slf: Borrowed<'_, '_, Self>) -> PyResult<Py<PyAny>> {
        Ok(slf.to_owned().into_any().unbind())
    }

    fn step(slf: Borrowed<'_, '_, Self>) -> PyResult<Py<PyAny>> {
        slf.get().step(slf.py())
    }
}

/// Replaces three slots of `T`'s type with direct C entry points, so that `await` costs no
/// Python frame, no argument parsing and, where the interpreter asks for it, no exception:
///
/// * `am_await` calls [`FastAwait::enter`] (for [`Awaitable`]: the object itself);
/// * `am_send` (`PyIter_Send`: the `await` of Python 3.10 and 3.11, and asyncio's tasks on
///   every version) hands the value back as `PYGEN_RETURN`, with no `StopIteration`;
/// * `tp_iternext` (the `await` of Python 3.12 and later) finishes a `None` result by returning
///   `NULL` with no exception set, which the interpreter reads as `StopIteration(None)`, and
///   raises `StopIteration(value)` only for other values.
///
/// The Python-level `__await__`, `__next__` and `send` methods stay PyO3's; only the slots the
/// interpreter calls directly change. Called once per type, from the module's initialisation.
pub(crate) fn install_fast_slots<T: FastAwait>(py: Python<'_>) {
    let kind = T::type_object_raw(py);
    // SAFETY: `kind` is the heap type PyO3 created for `T`; because the class defines
    // `__await__`, its `tp_as_async` points at the type's own `PyAsyncMethods`. Nothing has
    // used the type yet, and `PyType_Modified` drops any cached lookups.
    unsafe {
        let async_methods = (*kind).tp_as_async;
        assert!(!async_methods.is_null(), "the class defines __await__");
        (*async_methods).am_await = Some(await_slot::<T>);
        (*async_methods).am_send = Some(send_slot::<T>);
        (*kind).tp_iternext = Some(iternext_slot::<T>);
        ffi::PyType_Modified(kind);
    }
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

unsafe extern "C" fn await_slot<T: FastAwait>(slf: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls slots attached, with a live `T`.
    unsafe {
        let py = Python::assume_attached();
        match T::enter(this::<T>(py, slf)) {
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
    _value: *mut ffi::PyObject,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    // SAFETY: the interpreter calls slots attached, with a live `T` and a valid `result`.
    unsafe {
        let py = Python::assume_attached();
        match T::step(this::<T>(py, slf)) {
            Ok(value) => {
                *result = value.into_ptr();
                ffi::PySendResult::PYGEN_RETURN
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
        match T::step(this::<T>(py, slf)) {
            Ok(value) if value.is_none(py) => {}
            Ok(value) => finish_with(py, value),
            Err(err) => err.restore(py),
        }
        std::ptr::null_mut()
    }
}

/// Raises `StopIteration(value)`, the iterator protocol's way of returning `value`.
pub(crate) fn finish_with(py: Python<'_>, value: Py<PyAny>) {
    let value = value.into_bound(py);
    // A tuple or an exception given to `PyErr_SetObject` would be taken apart as arguments,
    // so those (never a budget's result, but cheap to get right) are wrapped first.
    if value.is_instance_of::<PyTuple>() || value.is_instance_of::<PyBaseException>() {
        PyStopIteration::new_err((value.unbind(),)).restore(py);
    } else {
        // SAFETY: attached; both pointers are live for the call.
        unsafe { ffi::PyErr_SetObject(ffi::PyExc_StopIteration, value.as_ptr()) };
    }
}
