//! The PyO3 binding layer: converts arguments, results and errors, and nothing else.
//! Policy lives in [`crate::core`]; everything naturally Python lives in `python/costbound`.

mod args;
mod awaitable;
mod coroutine;
mod error;
mod fastcall;
mod panic_guard;
mod reservation;
mod token;
mod unit;
mod wait;

use pyo3::prelude::*;

/// `costbound._native`: the lock-free budgets. Import `costbound`, not this module.
#[pymodule(gil_used = false)]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    refuse_subinterpreters()?;
    // Token requests issue and refund the token budget's reservations; handed over here so
    // that `wait` need not import `token` (which imports `wait`).
    wait::use_reservations(wait::Reservations {
        issue: reservation::issue_reservation,
        refund: |reservation| match reservation.cast::<reservation::ReservationPy>() {
            Ok(reservation) => reservation.get().refund_if_armed(reservation.py()),
            Err(_) => Ok(()),
        },
    });
    m.add_class::<unit::AtomicBudgetPy>()?;
    fastcall::add_method::<unit::TryReserveSync>(m.py())?;
    fastcall::add_method::<unit::ReleaseSync>(m.py())?;
    fastcall::add_method::<unit::TryReserve>(m.py())?;
    fastcall::add_method::<unit::Release>(m.py())?;
    fastcall::add_timeout_method::<unit::Reserve>(m.py())?;
    fastcall::add_timeout_method::<unit::ReserveBlocking>(m.py())?;
    m.add_class::<token::AtomicTokenBudgetPy>()?;
    fastcall::add_timeout_method::<token::ReserveTokens>(m.py())?;
    fastcall::add_timeout_method::<token::ReserveTokensBlocking>(m.py())?;
    m.add_class::<reservation::ReservationPy>()?;
    m.add_class::<reservation::NativeRefundPy>()?;
    m.add_class::<awaitable::Awaitable>()?;
    coroutine::install_fast_slots::<awaitable::Awaitable>(m.py())?;
    // Made at import, so that no call ever has to allocate (or fail to allocate) it.
    awaitable::Awaitable::none(m.py())?;
    m.add_class::<wait::PermitPy>()?;
    coroutine::install_fast_slots::<wait::PermitPy>(m.py())?;
    m.add_class::<wait::TokenRequestPy>()?;
    coroutine::install_fast_slots::<wait::TokenRequestPy>(m.py())?;
    m.add_class::<wait::WaiterPy>()?;
    m.add_class::<wait::WatchPy>()?;
    m.add_class::<wait::ManualClockPy>()?;
    m.add_function(wrap_pyfunction!(reservation::register_reservation_type, m)?)?;
    m.add_function(wrap_pyfunction!(wait::register_wait, m)?)?;
    m.add("MAX_RATE", crate::core::MAX_RATE)?;
    m.add("MAX_UNITS", u64::MAX)?;
    m.add("MAX_TOKEN_CAPACITY", crate::core::MAX_TOKEN_CAPACITY)?;
    Ok(())
}

/// `ImportError` in any interpreter but the main one. The module keeps process-wide state (the
/// shared `None` awaitable, the registered reservation type, the wait hook, the running-loop
/// lookup, and the wake-ups its budgets send from any thread), which one interpreter's objects
/// must never reach from another, so multiple interpreters are not supported.
fn refuse_subinterpreters() -> PyResult<()> {
    // SAFETY: called during the module's initialisation, attached to the importing interpreter.
    let (here, main) = unsafe {
        (
            pyo3::ffi::PyInterpreterState_Get(),
            pyo3::ffi::PyInterpreterState_Main(),
        )
    };
    if here == main {
        return Ok(());
    }
    Err(pyo3::exceptions::PyImportError::new_err(
        "costbound does not support subinterpreters: its native module keeps process-wide \
         state, so import costbound in the main interpreter only",
    ))
}
