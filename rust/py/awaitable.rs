//! The awaitables the async methods return: no event-loop turn, no Python frame.

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::PyClass;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::coroutine::{FastAwait, Step, step_to_python, to_exception};

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
    /// return the value. The one for `None` is made once, at import, and shared.
    Ready(Py<PyAny>),
    /// A grant, made on the first step as a coroutine would make it: an awaitable that is
    /// never awaited, or a task cancelled before it starts, takes nothing.
    Deferred {
        started: AtomicBool,
        /// The budget that makes the grant (a [`Grant`]).
        owner: Py<PyAny>,
        amount: u64,
        /// [`grant_as`] for the owner's type.
        grant: GrantFn,
    },
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

/// A budget whose non-waiting reservation an awaitable makes on its first step. The budget
/// types implement it, so that this module knows none of them.
pub(crate) trait Grant:
    PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + Sync
{
    /// Reserves `amount` if it fits now: the value the await returns (`True` / `False`, an
    /// armed reservation or `None`).
    fn grant<'py>(&self, py: Python<'py>, amount: u64) -> PyResult<Bound<'py, PyAny>>;
}

/// [`Grant::grant`] of an owner whose type was erased.
type GrantFn = for<'py> fn(&Bound<'py, PyAny>, u64) -> PyResult<Bound<'py, PyAny>>;

/// [`Grant::grant`] for an owner of type `G`: a plain function, so that an awaitable holds no
/// boxed closure (no allocation beyond the awaitable itself).
fn grant_as<'py, G: Grant>(owner: &Bound<'py, PyAny>, amount: u64) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: `Awaitable::deferred::<G>` pairs this function only with an owner of type `G`.
    let owner = unsafe { owner.cast_unchecked::<G>() };
    owner.get().grant(owner.py(), amount)
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

    /// The shared completed awaitable for `None` (made at import, so no later call allocates).
    #[inline]
    pub(crate) fn none(py: Python<'_>) -> PyResult<Py<Self>> {
        match READY_NONE.get(py) {
            Some(none) => Ok(none.clone_ref(py)),
            None => Self::make_none(py),
        }
    }

    #[cold]
    fn make_none(py: Python<'_>) -> PyResult<Py<Self>> {
        READY_NONE
            .get_or_try_init(py, || Self::ready(py, py.None()))
            .map(|none| none.clone_ref(py))
    }

    /// An awaitable that asks `owner` for `amount` when first stepped.
    pub(crate) fn deferred<G: Grant>(owner: &Bound<'_, G>, amount: u64) -> PyResult<Py<Self>> {
        Py::new(
            owner.py(),
            Self {
                outcome: Outcome::Deferred {
                    started: AtomicBool::new(false),
                    owner: owner.clone().into_any().unbind(),
                    amount,
                    grant: grant_as::<G>,
                },
            },
        )
    }

    /// The value of the first (and only) step.
    fn step<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.outcome {
            Outcome::Ready(value) => Ok(value.bind(py).clone()),
            Outcome::Deferred {
                started,
                owner,
                amount,
                grant,
            } => {
                if !claim(started) {
                    return Err(PyRuntimeError::new_err(
                        "cannot reuse an already awaited budget call",
                    ));
                }
                grant(owner.bind(py), *amount)
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
    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        step_to_python(<Self as FastAwait>::step(slf.as_borrowed()).map(Step::Return))
    }

    /// `send` as a generator has it: the same single step as `__next__`.
    fn send(slf: &Bound<'_, Self>, value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        step_to_python(Self::resume(slf.as_borrowed(), value.as_borrowed()))
    }

    /// An exception thrown in (a task cancelled before its first step) propagates as is, and a
    /// deferred grant is then never made.
    #[pyo3(signature = (exception, value = None, traceback = None))]
    fn throw(
        slf: &Bound<'_, Self>,
        exception: &Bound<'_, PyAny>,
        value: Option<&Bound<'_, PyAny>>,
        traceback: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let _ = traceback; // the legacy third argument of `generator.throw`
        let exception = to_exception(exception, value)?; // bad input: nothing is abandoned
        step_to_python(<Self as FastAwait>::throw(slf.as_borrowed(), exception))
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

impl FastAwait for Awaitable {
    fn enter<'py>(slf: Borrowed<'_, 'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Ok(slf.to_owned().into_any())
    }

    fn step<'py>(slf: Borrowed<'_, 'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.get().step(slf.py())
    }

    fn throw<'py>(
        slf: Borrowed<'_, 'py, Self>,
        exception: Bound<'py, PyAny>,
    ) -> PyResult<Step<'py>> {
        slf.get().abandon();
        Err(PyErr::from_value(exception))
    }

    fn close(slf: Borrowed<'_, '_, Self>) -> PyResult<()> {
        slf.get().abandon();
        Ok(())
    }
}
