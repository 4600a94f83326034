//! Where rate refill reads the time: the monotonic clock, or a clock that tests drive.
//!
//! On Linux the monotonic clock is read as `CLOCK_MONOTONIC_COARSE`: the same clock, updated at
//! every scheduler tick (1 to 4 ms) and read in about 3 ns instead of about 22 ns, which is most
//! of what a rated reservation costs. The refill is exact all the same (it depends on the clock
//! only through the elapsed time, and never rounds); units simply flow in steps of one tick, and
//! a waiter's timer is set one tick late so that the clock has moved when it fires.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use super::sync::{AtomicU64, Ordering};

/// Nanoseconds elapsed since a budget was made, from the monotonic clock or a [`ManualClock`].
#[derive(Debug, Clone)]
pub enum Clock {
    /// The monotonic clock, from the reading given (see [`Clock::monotonic`]).
    Monotonic(u64),
    /// A clock that only moves when [`ManualClock::advance`] is called.
    Manual(Arc<ManualClock>),
}

/// The monotonic clock in nanoseconds from an arbitrary origin: the coarse clock on Linux.
#[cfg(target_os = "linux")]
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; the clock id is valid on every Linux since
    // 2.6.32, and the call cannot fail with valid arguments.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut now) };
    let seconds = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    seconds.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// The monotonic clock in nanoseconds from an arbitrary origin: `Instant` elsewhere.
#[cfg(not(target_os = "linux"))]
fn monotonic_ns() -> u64 {
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    let origin = ORIGIN.get_or_init(std::time::Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// How far a monotonic reading may lag the true time (one tick of the coarse clock).
fn monotonic_resolution_ns() -> u64 {
    static RESOLUTION: OnceLock<u64> = OnceLock::new();
    *RESOLUTION.get_or_init(|| {
        #[cfg(target_os = "linux")]
        {
            let mut res = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: as in `monotonic_ns`.
            let failed = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut res) };
            let nanos = u64::try_from(res.tv_nsec).unwrap_or(0)
                + u64::try_from(res.tv_sec).unwrap_or(0) * 1_000_000_000;
            if failed == 0 && nanos > 0 {
                nanos
            } else {
                10_000_000
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            0 // `Instant` is precise: no lag
        }
    })
}

impl Clock {
    /// The monotonic clock, starting now.
    #[must_use]
    pub fn monotonic() -> Self {
        Self::Monotonic(monotonic_ns())
    }

    /// Nanoseconds since the clock's origin (saturating after some 584 years).
    #[must_use]
    pub fn now_ns(&self) -> u64 {
        match self {
            Self::Monotonic(origin) => monotonic_ns().saturating_sub(*origin),
            Self::Manual(clock) => clock.now_ns(),
        }
    }

    /// How far a reading may lag the true time: a timer waiting for the clock to reach some
    /// reading must wait this much longer.
    #[must_use]
    pub fn resolution_ns(&self) -> u64 {
        match self {
            Self::Monotonic(_) => monotonic_resolution_ns(),
            Self::Manual(_) => 0,
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
