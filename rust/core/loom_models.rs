//! Model checks of every compare-and-swap path under all interleavings loom explores.
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_models`.

use std::sync::Arc;

use loom::thread;

use super::{Hold, RecordError, TokenLedger, UnitBudget};

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
