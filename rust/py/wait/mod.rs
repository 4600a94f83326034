//! Waiting for room: `Permit`, the token request that `reserve_tokens` returns, the waiter
//! handle the Python side of an async wait drives, blocking waits, and `ManualClock`.
//!
//! The fast path (room now, no one queued) is native and completes `await` without suspending.
//! Only a wait that must suspend goes to `costbound._waiting.wait`, a small coroutine that owns
//! the asyncio side (a future on the caller's loop, timers, cancellation) and drives a
//! [`WaiterPy`], whose grant the core's queue makes.
//!
//! One concern a file: [`arguments`] reads the waiting calls' arguments, [`blocking`] waits on a
//! thread, [`request`] is the state a permit and a token request share (and the hand-over to
//! `costbound._waiting`), [`waiter`] and [`watch`] are the handles the Python side drives,
//! [`permit`] and [`token_request`] the two requests, and [`clock`] the test clock.

mod arguments;
mod blocking;
mod clock;
mod permit;
mod request;
mod token_request;
mod waiter;
mod watch;

pub(crate) use arguments::{check_fits, rate_error, to_rate, to_timeout};
pub(crate) use clock::{ManualClockPy, to_clock};
pub(crate) use permit::PermitPy;
pub(crate) use request::register_wait;
pub(crate) use token_request::{Reservations, TokenRequestPy, use_reservations};
pub(crate) use waiter::WaiterPy;
pub(crate) use watch::{WatchPy, seconds_until};
