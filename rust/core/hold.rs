//! One reservation's single-use claim on the ledger that granted it.

use std::fmt;
use std::sync::{Arc, Weak};

use super::sync::{AtomicBool, Ordering};
use super::token::TokenLedger;

/// Why [`Hold::record`] refused to settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// The hold was issued by another ledger; nothing changed.
    Foreign,
    /// The hold was already settled, refunded or taken; nothing changed.
    AlreadyReconciled,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Foreign => "the reservation was issued by another budget",
            Self::AlreadyReconciled => "the reservation was already reconciled or disarmed",
        })
    }
}

impl std::error::Error for RecordError {}

/// The estimate a ledger granted, claimable exactly once: by a settlement, by a refund, or by
/// [`take`](Self::take), which moves the claim into a fresh hold.
///
/// The ledger is reached through a `Weak`, so a hold never keeps its budget alive; refunding to a
/// budget that is gone does nothing. The claim is one atomic swap, so when several threads settle,
/// refund or take one hold at once exactly one of them wins.
///
/// ```
/// use std::sync::Arc;
/// use costbound::core::{Hold, RecordError, TokenLedger};
/// let ledger = Arc::new(TokenLedger::new(1_000));
/// let hold = Hold::try_reserve(&ledger, 400).unwrap();
/// assert_eq!(hold.record(&ledger, 120, 80), Ok(()));
/// assert_eq!(hold.record(&ledger, 120, 80), Err(RecordError::AlreadyReconciled));
/// assert!(!hold.refund(), "already claimed");
/// assert_eq!((ledger.available(), ledger.consumed()), (800, 200));
/// ```
#[derive(Debug)]
pub struct Hold {
    ledger: Weak<TokenLedger>,
    estimate: u64,
    claimed: AtomicBool,
}

impl Hold {
    /// Reserves `estimate` on `ledger` and returns the armed hold, or `None` if it was denied.
    pub fn try_reserve(ledger: &Arc<TokenLedger>, estimate: u64) -> Option<Self> {
        ledger.try_reserve(estimate).then(|| Self {
            ledger: Arc::downgrade(ledger),
            estimate,
            claimed: AtomicBool::new(false),
        })
    }

    /// Holds `estimate` that the ledger's queue already deducted for a granted waiter (see
    /// [`TokenLedger::cancel`]). Adopting an estimate that was not deducted would create tokens.
    #[must_use]
    pub fn adopt(ledger: &Arc<TokenLedger>, estimate: u64) -> Self {
        Self {
            ledger: Arc::downgrade(ledger),
            estimate,
            claimed: AtomicBool::new(false),
        }
    }

    /// The estimate that was reserved.
    #[must_use]
    pub fn estimate(&self) -> u64 {
        self.estimate
    }

    /// Whether the claim is still unspent.
    #[must_use]
    pub fn is_armed(&self) -> bool {
        !self.claimed.load(Ordering::Acquire)
    }

    /// Whether `ledger` issued this hold.
    #[must_use]
    pub fn is_from(&self, ledger: &Arc<TokenLedger>) -> bool {
        std::ptr::eq(self.ledger.as_ptr(), Arc::as_ptr(ledger))
    }

    /// Spends the claim; `true` for exactly one caller.
    fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }

    /// Settles against the provider's `prompt + completion` (saturating) on `ledger`, which must
    /// be the issuing ledger. Nothing changes on error.
    pub fn record(
        &self,
        ledger: &Arc<TokenLedger>,
        prompt: u64,
        completion: u64,
    ) -> Result<(), RecordError> {
        if !self.is_from(ledger) {
            return Err(RecordError::Foreign);
        }
        if !self.claim() {
            return Err(RecordError::AlreadyReconciled);
        }
        ledger.settle(self.estimate, prompt.saturating_add(completion));
        Ok(())
    }

    /// Refunds the whole estimate if the claim is unspent; returns whether it was. A ledger that
    /// no longer exists is left alone. There is no partial refund: the part not given back
    /// would be lost for good, since the claim is spent.
    pub fn refund(&self) -> bool {
        if !self.claim() {
            return false;
        }
        if let Some(ledger) = self.ledger.upgrade() {
            ledger.refund(self.estimate);
        }
        true
    }

    /// Moves the unspent claim into a new hold (which the caller now owns) and spends this one;
    /// `None` if it was already spent.
    pub fn take(&self) -> Option<Self> {
        let vessel = self.vessel();
        self.hand_over(&vessel).then_some(vessel)
    }

    /// A spent hold on the same ledger and estimate, for [`hand_over`](Self::hand_over) to arm:
    /// made before the claim moves, so that the claim is never in neither hold.
    #[must_use]
    pub fn vessel(&self) -> Self {
        Self {
            ledger: self.ledger.clone(),
            estimate: self.estimate,
            claimed: AtomicBool::new(true),
        }
    }

    /// Spends this hold's claim and arms `vessel` with it (a [`vessel`](Self::vessel) of this
    /// hold that no one else uses yet); `false`, and nothing changes, if it was already spent.
    pub fn hand_over(&self, vessel: &Self) -> bool {
        debug_assert!(std::ptr::eq(self.ledger.as_ptr(), vessel.ledger.as_ptr()));
        debug_assert_eq!(self.estimate, vessel.estimate);
        if !self.claim() {
            return false;
        }
        vessel.claimed.store(false, Ordering::Release);
        true
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;

    use super::{Hold, RecordError, TokenLedger};

    #[test]
    fn seed_drop_refunds_the_estimate() {
        let ledger = Arc::new(TokenLedger::new(1_000));
        let hold = Hold::try_reserve(&ledger, 400).unwrap();
        assert_eq!(ledger.available(), 600);
        assert!(hold.refund());
        assert_eq!((ledger.available(), ledger.consumed()), (1_000, 0));
        assert!(!hold.refund(), "a refund runs once");
        assert_eq!(ledger.available(), 1_000);
    }

    #[test]
    fn another_ledgers_hold_is_refused_and_left_armed() {
        let a = Arc::new(TokenLedger::new(10));
        let b = Arc::new(TokenLedger::new(10));
        let hold = Hold::try_reserve(&a, 5).unwrap();
        assert_eq!(hold.record(&b, 1, 1), Err(RecordError::Foreign));
        assert!(hold.is_armed());
        assert_eq!((a.available(), b.available(), b.consumed()), (5, 10, 0));
    }

    #[test]
    fn take_moves_the_claim_once() {
        let ledger = Arc::new(TokenLedger::new(10));
        let hold = Hold::try_reserve(&ledger, 4).unwrap();
        let taken = hold.take().unwrap();
        assert!(!hold.is_armed() && taken.is_armed());
        assert!(hold.take().is_none());
        assert_eq!(
            hold.record(&ledger, 1, 0),
            Err(RecordError::AlreadyReconciled)
        );
        assert!(taken.refund(), "the taken hold is armed");
        assert_eq!(ledger.available(), 10);
    }

    #[test]
    fn refund_after_the_ledger_is_gone_does_nothing() {
        let ledger = Arc::new(TokenLedger::new(10));
        let hold = Hold::try_reserve(&ledger, 4).unwrap();
        drop(ledger);
        assert!(hold.refund());
    }

    #[test]
    fn denied_reservation_gives_no_hold() {
        let ledger = Arc::new(TokenLedger::new(10));
        assert!(Hold::try_reserve(&ledger, 11).is_none());
        assert_eq!(ledger.available(), 10);
    }

    #[test]
    fn racing_claims_have_one_winner() {
        for _ in 0..200 {
            let ledger = Arc::new(TokenLedger::new(100));
            let hold = Arc::new(Hold::try_reserve(&ledger, 60).unwrap());
            let threads: Vec<_> = (0..4)
                .map(|i| {
                    let (hold, ledger) = (hold.clone(), ledger.clone());
                    std::thread::spawn(move || {
                        if i % 2 == 0 {
                            hold.record(&ledger, 10, 10).is_ok()
                        } else {
                            hold.refund()
                        }
                    })
                })
                .collect();
            let winners = threads.into_iter().map(|t| t.join().unwrap());
            assert_eq!(winners.filter(|&w| w).count(), 1);
            let a = ledger.available();
            assert!(a == 100 || (a == 80 && ledger.consumed() == 20), "{a}");
        }
    }
}
