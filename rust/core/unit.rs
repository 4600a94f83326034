//! A symmetric budget of unit costs: one `AtomicU64` holding the units available, or a rate
//! word when units flow back over time, and the queue of those who wait.

use std::sync::Arc;

use super::clock::{Clock, Wake};
use super::queue::WaitQueue;
use super::rate::{RateError, Refill};
use super::sync::{AtomicU64, Ordering};
use super::waitable::{Ledger, Waitable};

/// A lock-free budget of `capacity` units that callers reserve and release.
///
/// ```
/// use costbound::core::UnitBudget;
/// let budget = UnitBudget::new(100);
/// assert!(budget.try_reserve(60) && budget.try_reserve(40));
/// assert!(!budget.try_reserve(1));
/// budget.release(50);
/// assert_eq!(budget.available(), 50);
/// ```
#[derive(Debug)]
pub struct UnitBudget {
    capacity: u64,
    /// The units available, when there is no rate.
    available: AtomicU64,
    /// The units available, when they flow back at a rate.
    /// Boxed, so that a budget without a rate stays small: its word and the queue's counter
    /// share a cache line.
    refill: Option<Box<Refill>>,
    queue: WaitQueue,
}

impl UnitBudget {
    /// A full budget of `capacity` units.
    #[must_use]
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            available: AtomicU64::new(capacity),
            refill: None,
            queue: WaitQueue::new(),
        }
    }

    /// A full budget of `capacity` units to which `rate` units flow back per second (read from
    /// `clock`), up to `capacity`. A manual clock wakes its waiters when it advances.
    pub fn with_rate(capacity: u64, rate: f64, clock: Clock) -> Result<Arc<Self>, RateError> {
        let refill = Refill::new(rate, i128::from(capacity), 0, clock)?.map(Box::new);
        let budget = Arc::new(Self {
            refill,
            ..Self::new(capacity)
        });
        if let Some(Clock::Manual(clock)) = budget.refill.as_ref().map(|r| r.clock()) {
            clock.subscribe(Arc::downgrade(&budget) as std::sync::Weak<dyn Wake>);
        }
        Ok(budget)
    }

    /// The capacity given at construction.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The rate in units per second (`0.0` for none).
    #[must_use]
    pub fn rate(&self) -> f64 {
        self.refill.as_ref().map_or(0.0, |r| r.rate())
    }

    /// Units available now.
    #[must_use]
    pub fn available(&self) -> u64 {
        match &self.refill {
            None => self.available.load(Ordering::SeqCst),
            // Never below zero: only a take lowers it, and a take never overdraws.
            Some(refill) => u64::try_from(refill.balance()).unwrap_or(0),
        }
    }

    /// Takes `cost` units if that many are available and no one waits in the queue; otherwise
    /// changes nothing. Returns whether the units were taken.
    pub fn try_reserve(&self, cost: u64) -> bool {
        Waitable::try_reserve(self, cost)
    }

    /// Gives `cost` units back; `available` never exceeds `capacity`. Wakes waiters that fit.
    pub fn release(&self, cost: u64) {
        match &self.refill {
            None => {
                let capacity = self.capacity;
                // The closure never returns None, so the update always succeeds.
                let _ =
                    self.available
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                            Some(current.saturating_add(cost).min(capacity))
                        });
            }
            Some(refill) => refill.adjust(i128::from(cost)),
        }
        self.drain();
    }

    /// Restores `available` to `capacity` (the start of a scheduling epoch). Wakes waiters.
    pub fn refill(&self) {
        match &self.refill {
            None => self.available.store(self.capacity, Ordering::SeqCst),
            Some(refill) => refill.set(i128::from(self.capacity)),
        }
        self.drain();
    }

    /// `(capacity - available) / capacity`, in `[0, 1]`; `0.0` for a zero capacity.
    #[must_use]
    #[allow(clippy::cast_precision_loss)] // a ratio: f64 precision is the point
    pub fn utilization(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        let used = self.capacity - self.available().min(self.capacity);
        used as f64 / self.capacity as f64
    }
}

impl Ledger for UnitBudget {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn queue(&self) -> &WaitQueue {
        &self.queue
    }

    fn refill_word(&self) -> Option<&Refill> {
        self.refill.as_deref()
    }

    fn take(&self, cost: u64) -> bool {
        match &self.refill {
            // `fetch_update` is a `compare_exchange_weak` loop; a `None` from the closure denies.
            None => self
                .available
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                    current.checked_sub(cost)
                })
                .is_ok(),
            Some(refill) => refill.try_take(cost),
        }
    }

    fn give_back(&self, cost: u64) {
        self.release(cost);
    }

    fn has_room(&self, amount: u64) -> bool {
        self.available() >= amount
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::UnitBudget;

    #[test]
    fn seed_reserve_until_exhausted_then_release() {
        let b = UnitBudget::new(100);
        assert!(b.try_reserve(60) && b.try_reserve(40));
        assert!(!b.try_reserve(1));
        b.release(50);
        assert!(b.try_reserve(50));
    }

    #[test]
    fn seed_release_is_capped_at_capacity() {
        let b = UnitBudget::new(10);
        assert!(b.try_reserve(5));
        b.release(100);
        assert_eq!(b.available(), 10);
    }

    #[test]
    fn seed_refill_restores_capacity() {
        let b = UnitBudget::new(100);
        assert!(b.try_reserve(75));
        b.refill();
        assert_eq!(b.available(), 100);
    }

    #[test]
    #[allow(clippy::float_cmp)] // 40/100 is exact in the seed's example
    fn seed_utilization() {
        let b = UnitBudget::new(100);
        assert!(b.try_reserve(40));
        assert_eq!(b.utilization(), 0.4);
        assert_eq!(UnitBudget::new(0).utilization(), 0.0);
    }

    #[test]
    fn denial_changes_nothing_even_above_capacity() {
        let b = UnitBudget::new(10);
        assert!(!b.try_reserve(11));
        assert!(!b.try_reserve(u64::MAX));
        assert_eq!(b.available(), 10);
        assert!(b.try_reserve(0));
        assert_eq!(b.available(), 10);
    }

    #[test]
    fn extreme_values_neither_wrap_nor_panic() {
        let b = UnitBudget::new(u64::MAX);
        assert!(b.try_reserve(u64::MAX));
        assert_eq!(b.available(), 0);
        b.release(u64::MAX);
        b.release(u64::MAX);
        assert_eq!(b.available(), u64::MAX);
    }

    #[test]
    fn threads_never_overgrant() {
        let b = std::sync::Arc::new(UnitBudget::new(1_000));
        let granted: u64 = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| b.try_reserve(1)).count() as u64)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(granted, 1_000);
        assert_eq!(b.available(), 0);
    }
}
