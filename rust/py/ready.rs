//! An awaitable that is already complete: `await` returns its value without a turn of the
//! event loop, so the async methods cost about as much as their sync twins.

use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// A completed awaitable. It works on every event loop (and with `yield from` on Python 3.10
/// and 3.11) because awaiting it never suspends. Instances carry no state besides their value,
/// so those for `True`, `False` and `None` are shared.
#[pyclass(frozen, module = "costbound._native", name = "Ready")]
pub(crate) struct Ready {
    value: Py<PyAny>,
}

static READY_TRUE: PyOnceLock<Py<Ready>> = PyOnceLock::new();
static READY_FALSE: PyOnceLock<Py<Ready>> = PyOnceLock::new();
static READY_NONE: PyOnceLock<Py<Ready>> = PyOnceLock::new();

impl Ready {
    /// A completed awaitable for `value`.
    pub(crate) fn of(py: Python<'_>, value: Py<PyAny>) -> PyResult<Py<Self>> {
        Py::new(py, Self { value })
    }

    /// The shared completed awaitable for a `bool`.
    pub(crate) fn of_bool(py: Python<'_>, value: bool) -> Py<Self> {
        let cell = if value { &READY_TRUE } else { &READY_FALSE };
        cell.get_or_init(py, || {
            let value = pyo3::types::PyBool::new(py, value).to_owned().into_any();
            Py::new(
                py,
                Self {
                    value: value.unbind(),
                },
            )
            .expect("allocating a shared awaitable")
        })
        .clone_ref(py)
    }

    /// The shared completed awaitable for `None`.
    pub(crate) fn none(py: Python<'_>) -> Py<Self> {
        READY_NONE
            .get_or_init(py, || {
                Py::new(py, Self { value: py.None() }).expect("allocating a shared awaitable")
            })
            .clone_ref(py)
    }
}

#[pymethods]
impl Ready {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// The first (and only) step finishes: `StopIteration(value)`.
    #[allow(clippy::unnecessary_wraps)] // raising is the iterator protocol's way to return
    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Err(PyStopIteration::new_err((self.value.clone_ref(py),)))
    }

    /// `send` as a generator has it: the same single step as `__next__`.
    fn send(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let _ = value; // nothing to send into: the awaitable is already complete
        self.__next__(py)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<Ready {}>",
            self.value
                .bind(py)
                .repr()
                .map_or_else(|_| "?".into(), |r| r.to_string())
        )
    }
}
