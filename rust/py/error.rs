//! One error type for the binding layer, converted to a Python exception in one place.

use pyo3::PyErr;
use pyo3::exceptions::{PyTypeError, PyValueError};

use crate::core::RecordError;

/// Everything the binding layer can refuse. Each variant names the argument at fault.
#[derive(Debug)]
pub(crate) enum Error {
    /// An argument that must be an `int` (not `bool`) was something else: `TypeError`.
    NotAnInt {
        name: &'static str,
        type_name: String,
    },
    /// An integer argument outside `0..=max`: `ValueError`.
    OutOfRange {
        name: &'static str,
        max: u64,
        got: String,
    },
    /// A value that must be callable was not: `TypeError`.
    NotCallable {
        name: &'static str,
        type_name: String,
    },
    /// An argument of the wrong type altogether: `TypeError`.
    WrongType {
        name: &'static str,
        expected: &'static str,
        type_name: String,
    },
    /// A reservation that cannot be recorded here: `ValueError`.
    Record(RecordError),
}

impl From<RecordError> for Error {
    fn from(err: RecordError) -> Self {
        Self::Record(err)
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> Self {
        match err {
            Error::NotAnInt { name, type_name } => {
                PyTypeError::new_err(format!("{name} must be an int, not {type_name}"))
            }
            Error::OutOfRange { name, max, got } => PyValueError::new_err(format!(
                "{name} must be an integer in the range 0..={max}, got {got}"
            )),
            Error::NotCallable { name, type_name } => PyTypeError::new_err(format!(
                "{name} must be callable, got an object of type {type_name}"
            )),
            Error::WrongType {
                name,
                expected,
                type_name,
            } => PyTypeError::new_err(format!("{name} must be {expected}, not {type_name}")),
            Error::Record(err) => PyValueError::new_err(format!("record_usage: {err}")),
        }
    }
}
