//! Model checks of every compare-and-swap path under all interleavings loom explores.
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_models`.

use std::sync::Arc;

use loom::thread;

use loom::sync::atomic::{AtomicBool, Ordering};

use super::{Hold, RecordError, TokenLedger, UnitBudget, Waitable, Waiter};

/// A waiter whose wake-up sets a flag the model can read.
fn flagged(cost: u64) -> (Arc<Waiter>, Arc<AtomicBool>) {
    let woken = Arc::new(AtomicBool::new(false));
    let flag = woken.clone();
    (
        Waiter::new(cost, move || flag.store(true, Ordering::SeqCst)),
        woken,
    )
}

#[test]
fn unit_reserve_racing_reserve_grants_once() {
    loom::model(|| {
        let budget = Arc::new(UnitBudget::new(3));
        let other = budget.clone();
        let t = thread::spawn(move || other.try_reserve(2));
        let here = budget.try_reserve(2);
        let there = t.join().unwrap();
        assert!(
            here ^ there,
            "exactly one of two reserves of 2 out of 3 is granted"
        );
        assert_eq!(budget.available(), 1);
    });
}

#[test]
fn unit_reserve_racing_release_loses_nothing() {
    loom::model(|| {
        let budget = Arc::new(UnitBudget::new(4));
        assert!(budget.try_reserve(3));
        let other = budget.clone();
        let t = thread::spawn(move || other.release(3));
        let granted = budget.try_reserve(2);
        t.join().unwrap();
        assert_eq!(budget.available(), if granted { 2 } else { 4 });
    });
}

#[test]
fn unit_refill_racing_reserve() {
    loom::model(|| {
        let budget = Arc::new(UnitBudget::new(5));
        assert!(budget.try_reserve(4));
        let other = budget.clone();
        let t = thread::spawn(move || other.refill());
        let granted = budget.try_reserve(3);
        t.join().unwrap();
        // Reserved after the refill: 5 - 3; reserved before it (from 1 left): denied, then 5.
        assert_eq!(budget.available(), if granted { 2 } else { 5 });
    });
}

#[test]
fn token_reserve_racing_reserve_grants_once() {
    loom::model(|| {
        let ledger = Arc::new(TokenLedger::new(10));
        let other = ledger.clone();
        let t = thread::spawn(move || Hold::try_reserve(&other, 6).is_some());
        let here = Hold::try_reserve(&ledger, 6);
        let there = t.join().unwrap();
        assert!(here.is_some() ^ there);
        assert_eq!(ledger.available(), 4);
    });
}

#[test]
fn token_reserve_racing_refund() {
    loom::model(|| {
        let ledger = Arc::new(TokenLedger::new(10));
        let hold = Hold::try_reserve(&ledger, 6).unwrap();
        let t = thread::spawn(move || assert!(hold.refund()));
        let granted = Hold::try_reserve(&ledger, 8);
        t.join().unwrap();
        assert_eq!(ledger.available(), if granted.is_some() { 2 } else { 10 });
    });
}

#[test]
fn token_record_racing_drop_settles_once() {
    loom::model(|| {
        let ledger = Arc::new(TokenLedger::new(10));
        let hold = Arc::new(Hold::try_reserve(&ledger, 6).unwrap());
        let (dropper, l2) = (hold.clone(), ledger.clone());
        let t = thread::spawn(move || {
            let _keep = l2;
            dropper.refund()
        });
        let recorded = hold.record(&ledger, 5, 4);
        let refunded = t.join().unwrap();
        assert!(recorded.is_ok() ^ refunded, "exactly one claim wins");
        if refunded {
            assert_eq!(recorded, Err(RecordError::AlreadyReconciled));
            assert_eq!((ledger.available(), ledger.consumed()), (10, 0));
        } else {
            // 9 used against an estimate of 6: 3 over.
            assert_eq!((ledger.available(), ledger.consumed()), (1, 9));
        }
    });
}

#[test]
fn token_take_racing_record_moves_the_claim_once() {
    loom::model(|| {
        let ledger = Arc::new(TokenLedger::new(10));
        let hold = Arc::new(Hold::try_reserve(&ledger, 6).unwrap());
        let taker = hold.clone();
        let t = thread::spawn(move || taker.take());
        let recorded = hold.record(&ledger, 1, 1).is_ok();
        let taken = t.join().unwrap();
        assert!(recorded ^ taken.is_some());
        if let Some(taken) = taken {
            assert!(taken.refund());
            assert_eq!(ledger.available(), 10);
        } else {
            assert_eq!(ledger.available(), 8);
        }
    });
}

#[test]
fn token_refill_racing_reserve_in_debt() {
    loom::model(|| {
        let ledger = Arc::new(TokenLedger::new(10));
        assert!(ledger.try_reserve(10));
        ledger.settle(10, 14); // debt 4
        let other = ledger.clone();
        let t = thread::spawn(move || other.refill());
        // Before the refill the debt denies even 0; after it, 0 is granted and changes nothing.
        let granted = ledger.try_reserve(0);
        t.join().unwrap();
        assert_eq!((ledger.available(), ledger.debt()), (6, 0));
        assert!(granted || ledger.try_reserve(0));
    });
}

#[test]
fn token_settle_racing_refund_keeps_the_balance_equation() {
    loom::model(|| {
        let ledger = Arc::new(TokenLedger::new(10));
        let a = Hold::try_reserve(&ledger, 5).unwrap();
        let b = Hold::try_reserve(&ledger, 5).unwrap();
        let l2 = ledger.clone();
        let t = thread::spawn(move || a.record(&l2, 7, 1).unwrap());
        assert!(b.refund());
        t.join().unwrap();
        assert_eq!(ledger.balance(), 10 - 8);
        assert_eq!(ledger.consumed(), 8);
    });
}

#[test]
fn queue_enqueue_racing_release_loses_no_wake_up() {
    loom::model(|| {
        let budget = Arc::new(UnitBudget::new(1));
        assert!(budget.try_reserve(1));
        let other = budget.clone();
        let t = thread::spawn(move || other.release(1));
        let (waiter, woken) = flagged(1);
        budget.enqueue(waiter.clone());
        t.join().unwrap();
        // Whatever the order, the released unit ends with the waiter, which was told.
        assert!(waiter.is_granted());
        assert!(woken.load(Ordering::SeqCst));
        assert_eq!((budget.available(), budget.waiters()), (0, 0));
    });
}

#[test]
fn queue_refund_racing_enqueue_loses_no_wake_up() {
    loom::model(|| {
        let ledger = Arc::new(TokenLedger::new(5));
        let hold = Hold::try_reserve(&ledger, 5).unwrap();
        let t = thread::spawn(move || assert!(hold.refund()));
        let (waiter, woken) = flagged(3);
        ledger.enqueue(waiter.clone());
        t.join().unwrap();
        assert!(waiter.is_granted() && woken.load(Ordering::SeqCst));
        assert_eq!((ledger.available(), ledger.waiters()), (2, 0));
    });
}

#[test]
fn queue_cancel_racing_release_takes_nothing() {
    loom::model(|| {
        let budget = Arc::new(UnitBudget::new(2));
        assert!(budget.try_reserve(2));
        let (waiter, _woken) = flagged(2);
        budget.enqueue(waiter.clone());
        let other = budget.clone();
        let t = thread::spawn(move || other.release(2));
        // Cancelled before the grant: removed. After it: the caller owns the units and gives
        // them back. Either way nothing is taken and no waiter is left.
        if budget.cancel(&waiter) {
            budget.release(2);
        }
        t.join().unwrap();
        assert_eq!((budget.available(), budget.waiters()), (2, 0));
    });
}

#[test]
fn queue_try_reserve_racing_enqueue_grants_once() {
    loom::model(|| {
        let budget = Arc::new(UnitBudget::new(1));
        let other = budget.clone();
        let t = thread::spawn(move || other.try_reserve(1));
        let (waiter, _woken) = flagged(1);
        budget.enqueue(waiter.clone());
        let here = waiter.is_granted();
        let there = t.join().unwrap();
        assert!(here ^ there, "the one unit goes to exactly one of them");
        assert_eq!(budget.waiters(), usize::from(!here));
        assert_eq!(budget.available(), 0);
    });
}

#[test]
fn queue_serves_the_head_first() {
    loom::model(|| {
        let budget = Arc::new(UnitBudget::new(3));
        assert!(budget.try_reserve(3));
        let (big, _) = flagged(3);
        let (small, _) = flagged(1);
        budget.enqueue(big.clone());
        budget.enqueue(small.clone());
        let other = budget.clone();
        let t = thread::spawn(move || other.release(1));
        budget.release(2);
        t.join().unwrap();
        // 3 released in two steps: never the small one before the big one.
        assert!(big.is_granted() && !small.is_granted());
        assert_eq!((budget.available(), budget.waiters()), (0, 1));
    });
}

#[test]
fn queue_watch_racing_release_loses_no_wake_up() {
    loom::model(|| {
        let budget = Arc::new(UnitBudget::new(1));
        assert!(budget.try_reserve(1));
        let other = budget.clone();
        let t = thread::spawn(move || other.release(1));
        // An admission's order: watch, then try; if denied, it sleeps until woken.
        let (watcher, woken) = flagged(0);
        budget.watch(watcher.clone());
        let taken = budget.try_reserve(1);
        t.join().unwrap();
        assert!(
            taken || woken.load(Ordering::SeqCst),
            "denied, yet never told of the release"
        );
        assert!(!watcher.is_granted());
    });
}
