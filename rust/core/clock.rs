//! Where rate refill reads the time: the monotonic clock, or a clock that tests drive.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use super::sync::{AtomicU64, Ordering};

/// Nanoseconds elapsed since a budget was made, from the monotonic clock or a [`ManualClock`].
#[derive(Debug, Clone)]
pub enum Clock {
    /// `Instant::now()` measured from the moment the clock was made.
    Monotonic(Instant),
    /// A clock that only moves when [`ManualClock::advance`] is called.
    Manual(Arc<ManualClock>),
}

impl Clock {
    /// The monotonic clock, starting now.
    #[must_use]
    pub fn monotonic() -> Self {
        Self::Monotonic(Instant::now())
    }

    /// Nanoseconds since the clock's origin (saturating after some 584 years).
    #[must_use]
    pub fn now_ns(&self) -> u64 {
        match self {
            Self::Monotonic(origin) => {
                u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
            }
            Self::Manual(clock) => clock.now_ns(),
        }
    }

    /// Whether time moves only when a test says so (timers computed from it mean nothing then).
    #[must_use]
    pub fn is_manual(&self) -> bool {
        matches!(self, Self::Manual(_))
    }
}

/// Something whose waiters may fit once time has moved: a budget with a rate.
pub trait Wake: Send + Sync {
    /// Grants whatever waiters now fit.
    fn wake_waiters(&self);
}

/// A clock for tests: it starts at zero and moves only by [`advance`](Self::advance), which then
/// wakes the waiters of every budget that reads it.
///
/// ```
/// use costbound::core::ManualClock;
/// let clock = ManualClock::new();
/// clock.advance(1_500);
/// assert_eq!(clock.now_ns(), 1_500);
/// ```
#[derive(Default)]
pub struct ManualClock {
    now: AtomicU64,
    budgets: Mutex<Vec<Weak<dyn Wake>>>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("now_ns", &self.now_ns())
            .finish_non_exhaustive()
    }
}

impl ManualClock {
    /// A clock at zero.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Nanoseconds since the clock was made, as far as it has been advanced.
    #[must_use]
    pub fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Moves the clock `ns` forward (saturating), then wakes the waiters that now fit.
    pub fn advance(&self, ns: u64) {
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(ns))
            });
        let budgets: Vec<Arc<dyn Wake>> = {
            let mut budgets = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
            budgets.retain(|b| b.strong_count() > 0);
            budgets.iter().filter_map(Weak::upgrade).collect()
        };
        for budget in budgets {
            budget.wake_waiters();
        }
    }

    /// Makes [`advance`](Self::advance) wake `budget`'s waiters while it lives.
    pub fn subscribe(&self, budget: Weak<dyn Wake>) {
        self.budgets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(budget);
    }
}
