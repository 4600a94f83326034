//! The waiting calls' arguments: a timeout, a rate, a cost that must fit.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBool;

use crate::core::RateError;

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
pub(super) fn to_real(value: &Bound<'_, PyAny>, what: &str) -> PyResult<f64> {
    let wrong_type =
        || PyTypeError::new_err(format!("{what}, not {}", crate::py::args::type_name(value)));
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
pub(super) fn to_seconds(value: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
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
