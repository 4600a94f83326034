//! `ManualClock`, the clock tests of rate refill drive, and the `clock=` argument.

use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::arguments::to_seconds;
use crate::core::{Clock, ManualClock};

/// The clock a budget with `rate` reads: `clock` (a `ManualClock`) or the monotonic one.
pub(crate) fn to_clock(clock: Option<&Bound<'_, PyAny>>) -> PyResult<Clock> {
    match clock.filter(|c| !c.is_none()) {
        None => Ok(Clock::monotonic()),
        Some(clock) => clock
            .cast::<ManualClockPy>()
            .map(|c| Clock::Manual(c.get().clock.clone()))
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "clock must be a costbound.testing.ManualClock or None, not {}",
                    crate::py::args::type_name(clock)
                ))
            }),
    }
}

/// A clock for tests of rate refill: it starts at zero and moves only by `advance()`, which
/// wakes the waiters of every budget made with it. `from costbound.testing import ManualClock`.
#[pyclass(frozen, module = "costbound._native", name = "ManualClock")]
pub(crate) struct ManualClockPy {
    clock: Arc<ManualClock>,
}

#[pymethods]
impl ManualClockPy {
    #[new]
    fn new() -> Self {
        Self {
            clock: Arc::new(ManualClock::new()),
        }
    }

    /// Seconds since the clock was made, as far as it has been advanced.
    #[getter]
    fn now(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // seconds for display and arithmetic in tests
        let now = self.clock.now_ns() as f64;
        now / 1e9
    }

    /// Nanoseconds since the clock was made.
    #[getter]
    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Moves the clock `seconds` forward (rounded to the nanosecond) and grants the waiters that
    /// the refill now fits.
    fn advance(&self, seconds: &Bound<'_, PyAny>) -> PyResult<()> {
        let seconds = to_seconds(seconds, "seconds")?;
        if seconds.is_infinite() {
            return Err(PyValueError::new_err("seconds must be finite"));
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // >= 0, saturating
        let nanos = (seconds * 1e9).round() as u64;
        self.clock.advance(nanos);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("ManualClock(now={})", self.now())
    }
}
