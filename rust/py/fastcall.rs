//! Methods taking one unsigned integer, entered straight from `METH_FASTCALL`.
//!
//! The unit budget's reserve and release, sync and async, are the hottest path of the library:
//! the budget for the sync pair is about one bare C method call each. PyO3's generic argument
//! parsing and trampoline cost about as much again, so these few methods are registered on the
//! class by hand, with a fast path for the common call (one positional exact `int`) and the
//! shared conversion ([`to_u64`]) for everything else, so they accept and refuse exactly what
//! the other methods do.
//!
//! A release wakes the waiters it makes room for, which reaches Python (a waiter's wake-up), so
//! a panic there, or anywhere below, must not unwind into the interpreter: every entry runs its
//! body under [`catch_panic`], which costs nothing until something panics.
//!
//! `Python::assume_attached` does not raise PyO3's count of attached calls on this thread, so
//! code under these entries uses `Bound` (whose drop decrements at once) rather than dropping a
//! `Py<T>`, which PyO3 would defer through its locked reference pool.

use std::ffi::CStr;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::{PyClass, PyTypeInfo, ffi};

use super::args::to_u64;
use super::panic_guard::catch_panic;

/// A method of `Self::Class` that takes one unsigned integer argument.
pub(crate) trait U64Method {
    /// The class the method is added to.
    type Class: PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + PyTypeInfo + Sync;
    /// The method's name.
    const NAME: &'static CStr;
    /// The argument's name (it may also be passed by keyword).
    const ARG: &'static str;
    /// The largest value accepted.
    const MAX: u64;
    /// The docstring, with a `__text_signature__` line first.
    const DOC: &'static CStr;
    /// The method's body.
    fn call(this: &Bound<'_, Self::Class>, value: u64) -> PyResult<Py<PyAny>>;
}

/// Adds `M` to its class as a method descriptor.
pub(crate) fn add_method<M: U64Method>(py: Python<'_>) -> PyResult<()> {
    add_fastcall(
        py,
        M::Class::type_object_raw(py),
        M::NAME,
        M::DOC,
        entry::<M>,
    )
}

/// Adds a `METH_FASTCALL | METH_KEYWORDS` method `name` entered at `entry` to the type `kind`.
fn add_fastcall(
    py: Python<'_>,
    kind: *mut ffi::PyTypeObject,
    name: &'static CStr,
    doc: &'static CStr,
    entry: ffi::PyCFunctionFastWithKeywords,
) -> PyResult<()> {
    // The definition must outlive the type; one small allocation per method, once.
    let def: &'static mut ffi::PyMethodDef = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: entry,
        },
        ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
        ml_doc: doc.as_ptr(),
    }));
    // SAFETY: attached; `kind` is a live type object and `def` lives forever.
    unsafe {
        let descriptor = Bound::from_owned_ptr_or_err(py, ffi::PyDescr_NewMethod(kind, def))?;
        let dict = Bound::from_borrowed_ptr_or_err(py, (*kind).tp_dict)?;
        dict.set_item(
            pyo3::types::PyString::new(py, name.to_str().unwrap_or("?")),
            descriptor,
        )?;
        ffi::PyType_Modified(kind);
    }
    Ok(())
}

unsafe extern "C" fn entry<M: U64Method>(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the interpreter calls a method descriptor attached, with `slf` an instance of the
    // class it was made for (checked by the descriptor) and `args` holding `nargs` positional
    // values followed by one value per name in `kwnames`.
    unsafe {
        let py = Python::assume_attached();
        // Borrowed: the interpreter holds both references for the call.
        let this = Borrowed::from_ptr(py, slf).cast_unchecked::<M::Class>();
        let argument = match (nargs, kwnames.is_null()) {
            (1, true) => *args,
            (0, false) if keyword_is::<M>(py, kwnames) => *args,
            _ => {
                let message = format!(
                    "{}() takes exactly one argument ({})",
                    M::NAME.to_str().unwrap_or("?"),
                    M::ARG
                );
                PyTypeError::new_err(message).restore(py);
                return std::ptr::null_mut();
            }
        };
        let argument = Borrowed::from_ptr(py, argument);
        match catch_panic(|| M::call(&this, to_u64(&argument, M::ARG, M::MAX)?)) {
            Ok(result) => result.into_ptr(),
            Err(err) => {
                err.restore(py);
                std::ptr::null_mut()
            }
        }
    }
}

/// Whether `kwnames` is exactly `(M::ARG,)`.
///
/// # Safety
/// `kwnames` must be a live tuple of strings.
unsafe fn keyword_is<M: U64Method>(py: Python<'_>, kwnames: *mut ffi::PyObject) -> bool {
    // SAFETY: guaranteed by the caller.
    let names = unsafe { Bound::from_borrowed_ptr(py, kwnames) };
    names.len().is_ok_and(|n| n == 1)
        && names
            .get_item(0)
            .is_ok_and(|name| name.eq(M::ARG).unwrap_or(false))
}

/// A method of `Self::Class` that takes one unsigned integer and an optional keyword-only
/// `timeout`: the waiting calls (`reserve`, `reserve_blocking`, ...), whose uncontended path must
/// cost little more than a non-waiting reservation.
pub(crate) trait U64TimeoutMethod {
    /// The class the method is added to.
    type Class: PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + PyTypeInfo + Sync;
    /// The method's name.
    const NAME: &'static CStr;
    /// The integer argument's name (it may also be passed by keyword).
    const ARG: &'static str;
    /// The docstring, with a `__text_signature__` line first.
    const DOC: &'static CStr;
    /// The method's body; `timeout` is the keyword's value, if given.
    fn call(
        this: &Bound<'_, Self::Class>,
        value: &Bound<'_, PyAny>,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>>;
}

/// Adds `M` to its class as a method descriptor.
pub(crate) fn add_timeout_method<M: U64TimeoutMethod>(py: Python<'_>) -> PyResult<()> {
    add_fastcall(
        py,
        M::Class::type_object_raw(py),
        M::NAME,
        M::DOC,
        timeout_entry::<M>,
    )
}

unsafe extern "C" fn timeout_entry<M: U64TimeoutMethod>(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: as in `entry`: `args` holds `nargs` positional values followed by one value per
    // name in `kwnames` (a tuple of strings, or NULL).
    unsafe {
        let py = Python::assume_attached();
        let this = Borrowed::from_ptr(py, slf).cast_unchecked::<M::Class>();
        let outcome = catch_panic(|| {
            let (value, timeout) = parse_value_and_timeout::<M>(py, args, nargs, kwnames)?;
            let value = Borrowed::from_ptr(py, value);
            let timeout = timeout.map(|t| Borrowed::from_ptr(py, t));
            M::call(&this, &value, timeout.as_deref())
        });
        match outcome {
            Ok(result) => result.into_ptr(),
            Err(err) => {
                err.restore(py);
                std::ptr::null_mut()
            }
        }
    }
}

/// The integer argument and the `timeout` keyword of a call.
///
/// # Safety
/// As for [`timeout_entry`].
unsafe fn parse_value_and_timeout<M: U64TimeoutMethod>(
    py: Python<'_>,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<(*mut ffi::PyObject, Option<*mut ffi::PyObject>)> {
    let name = M::NAME.to_str().unwrap_or("?");
    let usage = || {
        PyTypeError::new_err(format!(
            "{name}() takes one argument ({}) and the keyword argument timeout",
            M::ARG
        ))
    };
    // SAFETY: guaranteed by the caller.
    unsafe {
        let mut value = match nargs {
            0 => None,
            1 => Some(*args),
            _ => return Err(usage()),
        };
        let mut timeout = None;
        if !kwnames.is_null() {
            let positional = usize::try_from(nargs).unwrap_or(0);
            // Keyword names in calls are interned strings: compare pointers first.
            let timeout_name = pyo3::intern!(py, "timeout");
            let count = usize::try_from(ffi::PyTuple_Size(kwnames)).unwrap_or(0);
            for i in 0..count {
                let key = ffi::PyTuple_GetItem(kwnames, isize::try_from(i).unwrap_or(0));
                let key = Borrowed::from_ptr_or_err(py, key)?;
                let slot = *args.add(positional + i);
                if (key.is(timeout_name) || key.eq(timeout_name)?) && timeout.is_none() {
                    timeout = Some(slot);
                } else if key.eq(M::ARG)? && value.is_none() {
                    value = Some(slot);
                } else {
                    return Err(PyTypeError::new_err(format!(
                        "{name}() got an unexpected or repeated keyword argument {}",
                        key.as_any()
                    )));
                }
            }
        }
        value.map(|v| (v, timeout)).ok_or_else(usage)
    }
}
