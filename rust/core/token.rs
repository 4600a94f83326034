//! Optimistic token accounting: a signed balance word (or a rate word when tokens flow back
//! over time), a consumed counter, and the queue of those who wait.

use std::sync::Arc;

use super::clock::{Clock, Wake};
use super::queue::WaitQueue;
use super::rate::{RateError, Refill};
use super::sync::{AtomicI64, AtomicU64, Ordering};
use super::waitable::{Ledger, Waitable};

/// The largest token capacity: the balance word is signed, so capacity fits in an `i64`.
pub const MAX_TOKEN_CAPACITY: u64 = i64::MAX as u64;

/// A lock-free token budget: reserve an estimate, later settle it against actual usage.
///
/// The state is one signed word, `balance = available - debt`, so an overage that exceeds what
/// is available becomes debt instead of being clamped away, and one compare-and-swap decides
/// every grant. `consumed` counts recorded usage. At every quiescent point without refills:
/// `balance == capacity - consumed - (estimates still held)`.
///
/// ```
/// use costbound::core::TokenLedger;
/// let ledger = TokenLedger::new(1_000);
/// assert!(ledger.try_reserve(100));
/// ledger.settle(100, 200); // 100 tokens over the estimate
/// assert_eq!((ledger.available(), ledger.consumed()), (800, 200));
/// ```
#[derive(Debug)]
pub struct TokenLedger {
    capacity: u64,
    /// `available - debt`, when there is no rate.
    balance: AtomicI64,
    /// The same, when tokens flow back at a rate.
    /// Boxed, so that a budget without a rate stays small: its word and the queue's counter
    /// share a cache line.
    refill: Option<Box<Refill>>,
    consumed: AtomicU64,
    queue: WaitQueue,
}

impl TokenLedger {
    /// A full ledger. `capacity` above [`MAX_TOKEN_CAPACITY`] is clamped to it; the binding
    /// layer rejects such values before they get here.
    #[must_use]
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity.min(MAX_TOKEN_CAPACITY);
        Self {
            capacity,
            balance: AtomicI64::new(to_balance(i128::from(capacity))),
            refill: None,
            consumed: AtomicU64::new(0),
            queue: WaitQueue::new(),
        }
    }

    /// A full ledger to which `rate` tokens flow back per second (read from `clock`), paying
    /// debt first, up to `capacity`. A manual clock wakes its waiters when it advances.
    pub fn with_rate(capacity: u64, rate: f64, clock: Clock) -> Result<Arc<Self>, RateError> {
        let capacity = capacity.min(MAX_TOKEN_CAPACITY);
        let refill =
            Refill::new(rate, i128::from(capacity), i128::from(i64::MIN), clock)?.map(Box::new);
        let ledger = Arc::new(Self {
            refill,
            ..Self::new(capacity)
        });
        if let Some(Clock::Manual(clock)) = ledger.refill.as_ref().map(|r| r.clock()) {
            clock.subscribe(Arc::downgrade(&ledger) as std::sync::Weak<dyn Wake>);
        }
        Ok(ledger)
    }

    /// The capacity given at construction.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The rate in tokens per second (`0.0` for none).
    #[must_use]
    pub fn rate(&self) -> f64 {
        self.refill.as_ref().map_or(0.0, |r| r.rate())
    }

    /// `available - debt`: positive when tokens are available, negative in debt.
    #[must_use]
    pub fn balance(&self) -> i64 {
        match &self.refill {
            None => self.balance.load(Ordering::SeqCst),
            Some(refill) => to_balance(refill.balance()),
        }
    }

    /// Tokens available now (`0` while in debt).
    #[must_use]
    pub fn available(&self) -> u64 {
        u64::try_from(self.balance()).unwrap_or(0)
    }

    /// Overage not yet paid back by refunds or refills (`0` unless in debt).
    #[must_use]
    pub fn debt(&self) -> u64 {
        let balance = self.balance();
        if balance < 0 {
            balance.unsigned_abs()
        } else {
            0
        }
    }

    /// Tokens recorded by [`settle`](Self::settle) since construction, saturating at `u64::MAX`.
    #[must_use]
    pub fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Acquire)
    }

    /// Deducts `estimate` if `available - debt >= estimate` and no one waits in the queue;
    /// otherwise changes nothing. In debt even an estimate of zero is denied.
    pub fn try_reserve(&self, estimate: u64) -> bool {
        Waitable::try_reserve(self, estimate)
    }

    /// Settles a reservation of `estimate` whose provider reported `actual` tokens: adds `actual`
    /// to `consumed`, then refunds `estimate - actual` or charges the overage (into debt if need be).
    pub fn settle(&self, estimate: u64, actual: u64) {
        let _ = self
            .consumed
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |c| {
                Some(c.saturating_add(actual))
            });
        self.adjust(i128::from(estimate) - i128::from(actual));
    }

    /// Gives `amount` back (a reservation dropped unused), capped at `capacity`.
    pub fn refund(&self, amount: u64) {
        self.adjust(i128::from(amount));
    }

    /// Adds `capacity` to the balance, capped at `capacity`: any debt is paid first.
    pub fn refill(&self) {
        self.adjust(i128::from(self.capacity));
    }

    /// Moves the balance by `delta`, capped at `capacity` above and saturating at `i64::MIN`
    /// (a debt of 2**63) below, then wakes the waiters that now fit.
    fn adjust(&self, delta: i128) {
        match &self.refill {
            None => {
                let capacity = i128::from(self.capacity);
                let _ = self
                    .balance
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                        Some(to_balance((i128::from(current) + delta).min(capacity)))
                    });
            }
            Some(refill) => refill.adjust(delta),
        }
        if delta > 0 {
            self.drain();
        }
    }
}

impl Ledger for TokenLedger {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn queue(&self) -> &WaitQueue {
        &self.queue
    }

    fn refill_word(&self) -> Option<&Refill> {
        self.refill.as_deref()
    }

    fn take(&self, estimate: u64) -> bool {
        match &self.refill {
            // `fetch_update` is a `compare_exchange_weak` loop; a `None` from the closure denies.
            None => self
                .balance
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
                    let free = u64::try_from(current).ok()?; // in debt: nothing is free
                    // estimate <= free <= i64::MAX, so the difference fits.
                    (free >= estimate)
                        .then(|| to_balance(i128::from(current) - i128::from(estimate)))
                })
                .is_ok(),
            Some(refill) => refill.try_take(estimate),
        }
    }

    fn give_back(&self, cost: u64) {
        self.refund(cost);
    }

    fn has_room(&self, amount: u64) -> bool {
        i128::from(self.balance()) >= i128::from(amount)
    }
}

/// Saturates an `i128` into the balance word's range.
fn to_balance(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{MAX_TOKEN_CAPACITY, TokenLedger};

    fn state(l: &TokenLedger) -> (u64, u64, u64) {
        (l.available(), l.debt(), l.consumed())
    }

    #[test]
    fn seed_record_consumes_actual_and_refunds_the_rest() {
        let l = TokenLedger::new(1_000);
        assert!(l.try_reserve(400));
        l.settle(400, 200);
        assert_eq!(state(&l), (800, 0, 200));
        assert!(l.try_reserve(800));
        assert!(!l.try_reserve(1));
    }

    #[test]
    fn seed_overage_is_charged() {
        let l = TokenLedger::new(1_000);
        assert!(l.try_reserve(100));
        l.settle(100, 200);
        assert_eq!(state(&l), (800, 0, 200));
    }

    #[test]
    fn seed_two_reservations_reconciled() {
        let l = TokenLedger::new(1_000);
        assert!(l.try_reserve(400) && l.try_reserve(400));
        l.settle(400, 200);
        assert_eq!(l.available(), 400);
        l.settle(400, 400);
        assert_eq!(state(&l), (400, 0, 600));
    }

    #[test]
    fn overage_beyond_available_becomes_debt_and_is_paid_first() {
        let l = TokenLedger::new(1_000);
        assert!(l.try_reserve(900));
        l.settle(900, 1_500); // 600 over, only 100 available
        assert_eq!(state(&l), (0, 500, 1_500));
        assert!(!l.try_reserve(0), "in debt even an estimate of 0 is denied");
        l.refund(200);
        assert_eq!(state(&l), (0, 300, 1_500));
        l.refill();
        assert_eq!(state(&l), (700, 0, 1_500));
    }

    #[test]
    fn refunds_and_refills_are_capped_at_capacity() {
        let l = TokenLedger::new(100);
        l.refund(50);
        l.refill();
        assert_eq!(l.available(), 100);
    }

    #[test]
    fn sums_saturate() {
        let l = TokenLedger::new(MAX_TOKEN_CAPACITY);
        assert!(l.try_reserve(MAX_TOKEN_CAPACITY));
        l.settle(MAX_TOKEN_CAPACITY, u64::MAX);
        l.settle(0, u64::MAX);
        assert_eq!(l.consumed(), u64::MAX);
        assert_eq!(l.debt(), 1 << 63);
        assert_eq!(TokenLedger::new(u64::MAX).capacity(), MAX_TOKEN_CAPACITY);
    }

    #[test]
    fn threads_keep_the_balance_equation() {
        let l = std::sync::Arc::new(TokenLedger::new(10_000));
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let mut actual_sum = 0u64;
                    for i in 0..5_000u64 {
                        let estimate = (i * 7 + t) % 50;
                        if l.try_reserve(estimate) {
                            if i % 3 == 0 {
                                l.refund(estimate);
                            } else {
                                let actual = (i * 13 + t) % 80;
                                actual_sum += actual;
                                l.settle(estimate, actual);
                            }
                        }
                    }
                    actual_sum
                })
            })
            .collect();
        let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(l.consumed(), total);
        assert_eq!(
            i128::from(l.balance()),
            10_000 - i128::from(total),
            "balance == capacity - consumed with nothing held"
        );
    }
}
