//! Waiting for room: what both budgets offer a waiter, and a blocking wait for threads.

use std::fmt;
use std::time::{Duration, Instant};

use super::queue::Waiter;
use super::waitable::Waitable;

/// Why a blocking wait ended without a grant. Either way nothing was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitError {
    /// The deadline passed.
    TimedOut,
    /// The caller's interruption check asked to stop.
    Interrupted,
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TimedOut => "timed out waiting for the budget",
            Self::Interrupted => "interrupted while waiting for the budget",
        })
    }
}

impl std::error::Error for WaitError {}

/// Waits on this thread, parked, until `cost` is granted in turn, or `deadline` passes. Woken by
/// whoever makes room (no polling); a budget with a rate also sets a timer for the moment the
/// refill makes the head of the queue fit. With `check_every`, `interrupted` is called at least
/// that often (for signals) and a `true` ends the wait. A grant that races the deadline is kept.
pub fn wait_blocking<B: Waitable + ?Sized>(
    budget: &B,
    cost: u64,
    deadline: Option<Instant>,
    check_every: Option<Duration>,
    mut interrupted: impl FnMut() -> bool,
) -> Result<(), WaitError> {
    if budget.try_reserve(cost) {
        return Ok(());
    }
    let thread = std::thread::current();
    let waiter = Waiter::new(cost, move || thread.unpark());
    budget.enqueue(waiter.clone());
    loop {
        if waiter.is_granted() {
            return Ok(());
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return if budget.cancel(&waiter) {
                Ok(())
            } else {
                Err(WaitError::TimedOut)
            };
        }
        let mut until = deadline;
        if let Some(nanos) = budget.nanos_until_fits(&waiter) {
            if nanos == 0 {
                budget.drain();
                continue;
            }
            if let Some(fits) = now.checked_add(Duration::from_nanos(nanos)) {
                until = Some(earliest(until, fits));
            }
        }
        if let Some(every) = check_every {
            if let Some(check) = now.checked_add(every) {
                until = Some(earliest(until, check));
            }
        }
        match until {
            Some(until) => std::thread::park_timeout(until.saturating_duration_since(now)),
            None => std::thread::park(),
        }
        if check_every.is_some() && !waiter.is_granted() && interrupted() {
            if budget.cancel(&waiter) {
                budget.give_back(cost);
            }
            return Err(WaitError::Interrupted);
        }
    }
}

fn earliest(a: Option<Instant>, b: Instant) -> Instant {
    a.map_or(b, |a| a.min(b))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{WaitError, wait_blocking};
    use crate::core::{Clock, ManualClock, TokenLedger, UnitBudget, Waitable};

    #[test]
    fn a_release_from_another_thread_hands_over_the_units() {
        let budget = Arc::new(UnitBudget::new(10));
        assert!(budget.try_reserve(10));
        let other = budget.clone();
        let releaser = std::thread::spawn(move || {
            while other.waiters() == 0 {
                std::thread::yield_now();
            }
            assert!(!other.try_reserve(1), "no jumping the queue");
            other.release(4);
        });
        assert_eq!(wait_blocking(&*budget, 4, None, None, || false), Ok(()));
        releaser.join().unwrap();
        assert_eq!((budget.available(), budget.waiters()), (0, 0));
    }

    #[test]
    fn waiters_are_served_in_arrival_order() {
        let budget = Arc::new(UnitBudget::new(10));
        assert!(budget.try_reserve(10));
        let mut threads = Vec::new();
        for (i, cost) in [(0, 8u64), (1, 1), (2, 1)] {
            let mine = budget.clone();
            threads.push(std::thread::spawn(move || {
                wait_blocking(&*mine, cost, None, None, || false)
            }));
            while budget.waiters() <= i {
                std::thread::yield_now();
            }
        }
        budget.release(2); // room for the two small ones, but the large one is first
        assert_eq!((budget.waiters(), budget.available()), (3, 2));
        budget.release(6); // now the first fits, and nothing is left for the others
        assert_eq!((budget.waiters(), budget.available()), (2, 0));
        budget.release(2);
        for t in threads {
            assert_eq!(t.join().unwrap(), Ok(()));
        }
        assert_eq!((budget.waiters(), budget.available()), (0, 0));
    }

    #[test]
    fn watchers_are_woken_by_room_and_by_a_shorter_line_but_granted_nothing() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use crate::core::Waiter;

        let budget = Arc::new(UnitBudget::new(2));
        assert!(budget.try_reserve(2));
        let woken = Arc::new(AtomicUsize::new(0));
        let count = woken.clone();
        let watcher = Waiter::new(0, move || {
            count.fetch_add(1, Ordering::SeqCst);
        });
        budget.watch(watcher.clone());
        assert_eq!((budget.watchers(), budget.waiters()), (1, 0));
        assert!(!budget.try_reserve(1), "watching takes no place in line");
        budget.release(1);
        assert_eq!((woken.load(Ordering::SeqCst), budget.available()), (1, 1));
        // A waiter in line, then cancelled: the shorter line wakes the watcher again.
        let queued = Waiter::new(2, || {});
        budget.enqueue(queued.clone());
        assert!(!budget.try_reserve(1));
        assert!(!budget.cancel(&queued));
        assert_eq!(woken.load(Ordering::SeqCst), 2);
        assert!(budget.try_reserve(1));
        budget.unwatch(&watcher);
        budget.release(2);
        assert_eq!((woken.load(Ordering::SeqCst), budget.watchers()), (2, 0));
        assert!(!watcher.is_granted());
    }

    #[test]
    fn a_timeout_takes_nothing_and_lets_the_next_through() {
        let budget = Arc::new(UnitBudget::new(10));
        assert!(budget.try_reserve(9));
        let deadline = Some(Instant::now() + Duration::from_millis(10));
        assert_eq!(
            wait_blocking(&*budget, 5, deadline, None, || false),
            Err(WaitError::TimedOut)
        );
        assert_eq!((budget.available(), budget.waiters()), (1, 0));
        assert!(budget.try_reserve(1));
    }

    #[test]
    fn an_interruption_takes_nothing() {
        let budget = UnitBudget::new(1);
        assert!(budget.try_reserve(1));
        let every = Some(Duration::from_millis(1));
        assert_eq!(
            wait_blocking(&budget, 1, None, every, || true),
            Err(WaitError::Interrupted)
        );
        assert_eq!((budget.available(), budget.waiters()), (0, 0));
    }

    #[test]
    fn the_rate_refill_wakes_the_head_by_a_timer() {
        let ledger = TokenLedger::with_rate(100, 1_000.0, Clock::monotonic()).unwrap();
        assert!(ledger.try_reserve(100));
        let started = Instant::now();
        assert_eq!(wait_blocking(&*ledger, 50, None, None, || false), Ok(()));
        assert!(started.elapsed() >= Duration::from_millis(45));
        assert_eq!(ledger.waiters(), 0);
    }

    #[test]
    fn a_manual_clock_advance_wakes_waiters() {
        let clock = Arc::new(ManualClock::new());
        let budget = UnitBudget::with_rate(10, 1.0, Clock::Manual(clock.clone())).unwrap();
        assert!(budget.try_reserve(10));
        let other = budget.clone();
        let waiter = std::thread::spawn(move || wait_blocking(&*other, 3, None, None, || false));
        while budget.waiters() == 0 {
            std::thread::yield_now();
        }
        clock.advance(2_000_000_000);
        assert_eq!(budget.waiters(), 1, "two units are not three");
        clock.advance(1_000_000_000);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert_eq!(budget.available(), 0);
    }
}
