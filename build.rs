//! Passes the interpreter's configuration (`Py_GIL_DISABLED`, `Py_3_x`) to the binding layer.

fn main() {
    #[cfg(feature = "python")]
    pyo3_build_config::use_pyo3_cfgs();
}
