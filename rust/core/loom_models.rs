//! Model checks of the lock-free paths under all interleavings loom explores: the unit word,
//! the token balance word, a hold's single-use claim, the rate word (lazy refill from a manual
//! clock), and the queue's no-lost-wake-up handshake. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_models`.
//!
//! loom has no 128-bit atomics, so under `--cfg loom` the rate word is a lock-based stand-in
//! (`sync::AtomicI128`) with the same load / compare-and-swap interface: its models check the
//! refill's retry loop and arithmetic under every interleaving of those steps, not the hardware
//! instruction. loom has no `Weak` either; the models keep every ledger alive.
//!
//! Every model thread is started with [`spawn`], never `loom::thread::spawn` directly: loom 0.7
//! never schedules a new thread whose first operation is a load ahead of its spawner
//! (tokio-rs/loom#392), and almost every path here begins with one (the queue's counter, the
//! clock), so such a model explores a single interleaving and can fail nothing.

use std::sync::Arc;

use loom::thread;

use loom::sync::atomic::{AtomicBool, Ordering};

use super::{Clock, Hold, ManualClock, RecordError, TokenLedger, UnitBudget, Waitable, Waiter};

/// Starts a model thread that loom interleaves with its spawner from its first step: the thread
/// first sets a flag its spawner reads, which makes the two dependent (see the module notes).
fn spawn<T: 'static>(f: impl FnOnce() -> T + 'static) -> thread::JoinHandle<T> {
    let started = flag();
    let set = started.clone();
    let handle = thread::spawn(move || {
        set.store(true, Ordering::SeqCst);
        f()
    });
    let _ = started.load(Ordering::SeqCst);
    handle
}

/// A flag one thread sets and another reads, to tell in a model which order things ran in.
fn flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// A token ledger of `capacity` refilling at `rate` per second from a manual clock, all taken.
fn drained_rated_ledger(capacity: u64, rate: f64) -> (Arc<TokenLedger>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let ledger = TokenLedger::with_rate(capacity, rate, Clock::Manual(clock.clone())).unwrap();
    assert!(ledger.try_reserve(capacity));
    (ledger, clock)
}

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
        let t = spawn(move || other.try_reserve(2));
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
        let t = spawn(move || other.release(3));
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
        let t = spawn(move || other.refill());
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
        let t = spawn(move || Hold::try_reserve(&other, 6).is_some());
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
        let t = spawn(move || assert!(hold.refund()));
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
        let t = spawn(move || {
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
        let t = spawn(move || taker.take());
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
        let (other, started, done) = (ledger.clone(), flag(), flag());
        let (started2, done2) = (started.clone(), done.clone());
        let t = spawn(move || {
            started2.store(true, Ordering::SeqCst);
            other.refill();
            done2.store(true, Ordering::SeqCst);
        });
        // In debt even 0 is denied; once the refill has paid the debt, 0 is granted.
        let refilled_before = done.load(Ordering::SeqCst);
        let granted = ledger.try_reserve(0);
        let refill_started = started.load(Ordering::SeqCst);
        t.join().unwrap();
        if refilled_before {
            assert!(granted, "denied after the refill paid the debt");
        }
        if !refill_started {
            assert!(!granted, "granted while in debt");
        }
        assert_eq!((ledger.available(), ledger.debt()), (6, 0));
    });
}

#[test]
fn token_settle_racing_refund_keeps_the_balance_equation() {
    loom::model(|| {
        let ledger = Arc::new(TokenLedger::new(10));
        let a = Hold::try_reserve(&ledger, 5).unwrap();
        let b = Hold::try_reserve(&ledger, 5).unwrap();
        let l2 = ledger.clone();
        let t = spawn(move || a.record(&l2, 7, 1).unwrap());
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
        let t = spawn(move || other.release(1));
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
        let t = spawn(move || assert!(hold.refund()));
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
        let t = spawn(move || other.release(2));
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
        let t = spawn(move || other.try_reserve(1));
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
        let t = spawn(move || other.release(1));
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
        let t = spawn(move || other.release(1));
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

#[test]
fn queue_watchers_is_never_miscounted_while_a_waiter_comes_and_goes() {
    loom::model(|| {
        let budget = Arc::new(UnitBudget::new(1));
        assert!(budget.try_reserve(1));
        let other = budget.clone();
        let t = spawn(move || {
            let (waiter, _) = flagged(1);
            other.enqueue(waiter.clone());
            assert!(!other.cancel(&waiter));
        });
        // No one watches: a difference of two counters read apart could say -1 or 1.
        assert_eq!(budget.watchers(), 0);
        t.join().unwrap();
        assert_eq!((budget.watchers(), budget.waiters()), (0, 0));
    });
}

// --- The rate word: lazy refill from a manual clock, racing reserves, refunds and waiters ----

#[test]
fn rate_reserves_racing_clock_advance_grant_once() {
    loom::model(|| {
        // 1 token a second, all 10 taken: 5 s later 5 are back, room for one reserve of 3.
        let (ledger, clock) = drained_rated_ledger(10, 1.0);
        let other = ledger.clone();
        let t = spawn(move || other.try_reserve(3));
        let advance = spawn(move || clock.advance(5_000_000_000));
        let here = ledger.try_reserve(3);
        let there = t.join().unwrap();
        advance.join().unwrap();
        assert!(!(here && there), "5 refilled tokens granted twice over");
        let granted = u64::from(here) + u64::from(there);
        assert_eq!(ledger.available(), 5 - 3 * granted, "a token lost or made");
    });
}

#[test]
fn rate_refund_racing_reserve_and_refill_loses_nothing() {
    loom::model(|| {
        // Capacity 30, 10 taken for good and 18 held (2 left), 1 token a second: the cap (30)
        // never binds below, so every order of the three must end with the same sum.
        let clock = Arc::new(ManualClock::new());
        let ledger = TokenLedger::with_rate(30, 1.0, Clock::Manual(clock.clone())).unwrap();
        assert!(ledger.try_reserve(10));
        let hold = Hold::try_reserve(&ledger, 18).unwrap();
        let (refunded, advanced) = (flag(), flag());
        let (refunded2, advanced2) = (refunded.clone(), advanced.clone());
        let t = spawn(move || {
            assert!(hold.refund());
            refunded2.store(true, Ordering::SeqCst);
        });
        let advance = spawn(move || {
            clock.advance(3_000_000_000);
            advanced2.store(true, Ordering::SeqCst);
        });
        let both_before = refunded.load(Ordering::SeqCst) && advanced.load(Ordering::SeqCst);
        let granted = ledger.try_reserve(6);
        t.join().unwrap();
        advance.join().unwrap();
        if both_before {
            assert!(granted, "23 tokens available, yet 6 denied");
        }
        // 2 left + 18 refunded + 3 refilled, less what was granted.
        assert_eq!(ledger.available(), if granted { 17 } else { 23 });
    });
}

#[test]
fn rate_fractions_written_between_half_steps_are_carried() {
    loom::model(|| {
        // 1 token a second, advanced half a second twice while a reserve of 0 rewrites the word
        // (at a time when only half a token has flowed): the half must not be rounded away.
        let (ledger, clock) = drained_rated_ledger(1, 1.0);
        let advance = spawn(move || {
            clock.advance(500_000_000);
            clock.advance(500_000_000);
        });
        assert!(ledger.try_reserve(0));
        advance.join().unwrap();
        assert_eq!(ledger.available(), 1);
        assert!(ledger.try_reserve(1) && !ledger.try_reserve(1));
    });
}

#[test]
fn rate_clock_advance_racing_enqueue_loses_no_wake_up() {
    loom::model(|| {
        let (ledger, clock) = drained_rated_ledger(5, 1.0);
        let advance = spawn(move || clock.advance(5_000_000_000));
        let (waiter, woken) = flagged(5);
        ledger.enqueue(waiter.clone());
        advance.join().unwrap();
        // Queued before the advance: its wake-up grants it; after: granted on enqueue.
        assert!(waiter.is_granted() && woken.load(Ordering::SeqCst));
        assert_eq!((ledger.available(), ledger.waiters()), (0, 0));
    });
}
