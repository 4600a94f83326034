//! Integer arguments: exact `int`s (and objects with `__index__`, such as NumPy integers),
//! never `bool` or `float`, with `ValueError` rather than PyO3's `OverflowError` out of range.

use std::ffi::c_ulong;

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};

use super::error::Error;

/// Reads `value` as an integer in `0..=max`; `name` is the argument named in the error.
pub(crate) fn to_u64(value: &Bound<'_, PyAny>, name: &'static str, max: u64) -> PyResult<u64> {
    if let Some(n) = exact_int(value).filter(|&n| n <= max) {
        return Ok(n);
    }
    if let Ok(int) = value.cast::<PyInt>() {
        if value.is_instance_of::<PyBool>() {
            return Err(not_an_int(value, name));
        }
        return in_range(int, name, max);
    }
    in_range(&index(value, name)?, name, max)
}

/// `operator.index(value)`: any other integer type (a NumPy integer, say) offers `__index__`.
/// Like every special method it is looked up on the type, never on the instance. An error that
/// `__index__` itself raises propagates, except a `TypeError` (it returned a non-int), which
/// becomes the error naming the argument.
fn index<'py>(value: &Bound<'py, PyAny>, name: &'static str) -> PyResult<Bound<'py, PyInt>> {
    let py = value.py();
    if is_numpy_bool(value) {
        // A bool is refused whatever its kind; NumPy before 2.3 still answers `__index__` for
        // its bools (with a DeprecationWarning), so `np.True_` would count as 1.
        return Err(not_an_int(value, name));
    }
    // SAFETY: attached (we hold a `Bound`); `value` is a live object. `PyIndex_Check` reads the
    // type's `nb_index` slot; `PyNumber_Index` returns a new reference to an exact `int`.
    unsafe {
        if ffi::PyIndex_Check(value.as_ptr()) == 0 {
            return Err(not_an_int(value, name));
        }
        Bound::from_owned_ptr_or_err(py, ffi::PyNumber_Index(value.as_ptr()))
    }
    .map_err(|err| {
        if err.is_instance_of::<PyTypeError>(py) {
            let replaced = not_an_int(value, name);
            replaced.set_cause(py, Some(err));
            replaced
        } else {
            err
        }
    })?
    .cast_into::<PyInt>()
    .map_err(|_| not_an_int(value, name))
}

/// Whether `value` is a NumPy bool (`numpy.bool`, named `bool_` before NumPy 2): the cold
/// path of arguments that are not exact `int`s.
fn is_numpy_bool(value: &Bound<'_, PyAny>) -> bool {
    let kind = value.get_type();
    kind.module()
        .is_ok_and(|module| module.to_str().is_ok_and(|m| m == "numpy"))
        && kind
            .name()
            .is_ok_and(|n| n.to_str().is_ok_and(|n| n == "bool" || n == "bool_"))
}

/// The value of an exact `int` in `0..=u64::MAX`, read in a few instructions; `None` for
/// anything else (subclasses, `bool`, negative or larger values), which the caller handles.
///
/// `PyLong_AsUnsignedLong` reads the digits directly where `c_ulong` has 64 bits; the
/// `long long` variant goes through a byte array for values of two digits or more (2**30 and
/// up), which made a large `cost` measurably slower than a small one.
pub(crate) fn exact_int(value: &Bound<'_, PyAny>) -> Option<u64> {
    let ptr = value.as_ptr();
    // SAFETY: attached (we hold a `Bound`); `ptr` is a live object.
    unsafe {
        if ffi::PyLong_CheckExact(ptr) == 0 {
            return None;
        }
        #[allow(clippy::useless_conversion)] // `c_ulong` is `u64` on some platforms only
        let n = if c_ulong::BITS == 64 {
            u64::from(ffi::PyLong_AsUnsignedLong(ptr))
        } else {
            ffi::PyLong_AsUnsignedLongLong(ptr)
        };
        if n == u64::MAX && !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear(); // negative or too large: the general path words the error
            return None;
        }
        Some(n)
    }
}

fn in_range(int: &Bound<'_, PyInt>, name: &'static str, max: u64) -> PyResult<u64> {
    match int.extract::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(Error::OutOfRange {
            name,
            max,
            got: int.to_string(),
        }
        .into()),
    }
}

fn not_an_int(value: &Bound<'_, PyAny>, name: &'static str) -> PyErr {
    Error::NotAnInt {
        name,
        type_name: type_name(value),
    }
    .into()
}

/// The qualified name of `value`'s type, for error messages.
pub(crate) fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .qualname()
        .map_or_else(|_| "object".to_owned(), |n| n.to_string())
}
