//! The pure core: budgets as atomic words, with no knowledge of Python.
//!
//! * [`UnitBudget`]: symmetric reserve/release of unit costs in one `AtomicU64`.
//! * [`TokenLedger`]: optimistic token accounting in one signed balance word
//!   (available minus debt) and a consumed counter.
//! * [`Hold`]: one token reservation's single-use claim on its ledger, which it
//!   reaches through a `Weak` so that it never keeps a budget alive.

mod clock;
mod hold;
mod queue;
mod rate;
mod sync;
mod token;
mod unit;
#[cfg(not(loom))]
mod wait;
mod waitable;

pub use clock::{Clock, ManualClock, Wake};
pub use hold::{Hold, RecordError};
pub use queue::{WaitQueue, Waiter};
pub use rate::{MAX_RATE, RateError, Refill};
pub use token::{MAX_TOKEN_CAPACITY, TokenLedger};
pub use unit::UnitBudget;
#[cfg(not(loom))]
pub use wait::{WaitError, wait_blocking};
pub use waitable::{Ledger, Waitable};

#[cfg(all(test, loom))]
mod loom_models;
