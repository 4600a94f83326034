//! A symmetric budget of unit costs: one `AtomicU64` holding the units available.

use super::sync::{AtomicU64, Ordering};

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
    available: AtomicU64,
}

impl UnitBudget {
    /// A full budget of `capacity` units.
    #[must_use]
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            available: AtomicU64::new(capacity),
        }
    }

    /// The capacity given at construction.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Units available now.
    #[must_use]
    pub fn available(&self) -> u64 {
        self.available.load(Ordering::Acquire)
    }

    /// Takes `cost` units if that many are available; otherwise changes nothing.
    /// Returns whether the units were taken.
    pub fn try_reserve(&self, cost: u64) -> bool {
        // `fetch_update` is a `compare_exchange_weak` loop; a `None` from the closure denies.
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |current| {
                current.checked_sub(cost)
            })
            .is_ok()
    }

    /// Gives `cost` units back; `available` never exceeds `capacity`.
    pub fn release(&self, cost: u64) {
        let capacity = self.capacity;
        // The closure never returns None, so the update always succeeds.
        let _ = self
            .available
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |current| {
                Some(current.saturating_add(cost).min(capacity))
            });
    }

    /// Restores `available` to `capacity` (the start of a scheduling epoch).
    pub fn refill(&self) {
        self.available.store(self.capacity, Ordering::Release);
    }

    /// `(capacity - available) / capacity`, in `[0, 1]`; `0.0` for a zero capacity.
    #[must_use]
    #[allow(clippy::cast_precision_loss)] // a ratio: f64 precision is the point
    pub fn utilization(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        let used = self.capacity - self.available();
        used as f64 / self.capacity as f64
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
