//! Criterion benches of the lock-free core, beside a `Mutex<u64>` baseline and a bare
//! `fetch_add` floor.
//!
//! One operation ("op") is one reserve-and-give-back pair:
//!
//! * `uncontended/*`, one thread, time per pair:
//!   * `unit_pair`: [`UnitBudget::try_reserve`] + [`UnitBudget::release`];
//!   * `token_pair`: [`TokenLedger::try_reserve`] + [`TokenLedger::settle`] (usage under the
//!     estimate, so part of it is refunded);
//!   * `hold_record`: [`Hold::try_reserve`] + [`Hold::record`], then the hold is dropped;
//!   * `hold_refund`: [`Hold::try_reserve`] + [`Hold::refund`] (the path a dropped,
//!     unrecorded reservation takes);
//!   * `mutex_pair`: the same check-and-subtract, then add back capped at capacity, on a
//!     `Mutex<u64>` (two lock acquisitions per pair);
//!   * `fetch_add_pair`: `AtomicU64::fetch_add` + `fetch_sub` with no check at all, the floor.
//! * `contended/{unit_pair,mutex_pair,fetch_add_pair}/N`: N = 1, 2, 4, 8 threads hammer one
//!   shared instance, each doing the same number of pairs; see [`contended`] for what the
//!   reported time means.
//! * `contended/unit_pair_scarce/N`: N = 2, 4, 8 threads race for a budget of a single unit,
//!   so reserves are denied whenever another thread holds it; the share of denials is printed
//!   to stderr after each case.
//!
//! Every other case uses capacities large enough that no reserve is ever denied (this is
//! asserted), so they measure the success path.
//!
//! Run with `cargo bench --bench core`. With `COSTBOUND_BENCH_SMOKE` set to anything,
//! warm-up and measurement are cut to 10 ms and 50 ms with 10 samples, for CI:
//! `COSTBOUND_BENCH_SMOKE=1 cargo bench --bench core`. `cargo bench --bench core -- --test`
//! runs every case once without measuring.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use costbound::core::{Hold, MAX_TOKEN_CAPACITY, TokenLedger, UnitBudget};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Thread counts of the contended cases (the bench machine may have fewer cores: past that,
/// threads time-share).
const THREADS: [usize; 4] = [1, 2, 4, 8];
/// Units taken by each unit reserve.
const COST: u64 = 1;
/// A unit capacity no number of concurrent holders here can exhaust.
const ROOMY: u64 = 1 << 40;
/// The token reservation's estimate and the usage it is settled with (below the estimate).
const ESTIMATE: u64 = 400;
const PROMPT: u64 = 120;
const COMPLETION: u64 = 80;

/// The baseline: `UnitBudget`'s semantics with a lock around a plain `u64`.
struct MutexBudget {
    capacity: u64,
    available: Mutex<u64>,
}

impl MutexBudget {
    fn new(capacity: u64) -> Self {
        Self {
            capacity,
            available: Mutex::new(capacity),
        }
    }

    fn try_reserve(&self, cost: u64) -> bool {
        let mut available = self.available.lock().unwrap();
        match available.checked_sub(cost) {
            Some(rest) => {
                *available = rest;
                true
            }
            None => false,
        }
    }

    fn release(&self, cost: u64) {
        let mut available = self.available.lock().unwrap();
        *available = available.saturating_add(cost).min(self.capacity);
    }
}

// Each pair returns whether its reserve was granted (the give-back runs only if it was).

fn unit_pair(budget: &UnitBudget) -> bool {
    let granted = budget.try_reserve(black_box(COST));
    if granted {
        budget.release(black_box(COST));
    }
    granted
}

fn token_pair(ledger: &TokenLedger) -> bool {
    let granted = ledger.try_reserve(black_box(ESTIMATE));
    if granted {
        ledger.settle(ESTIMATE, black_box(PROMPT + COMPLETION));
    }
    granted
}

fn hold_record(ledger: &Arc<TokenLedger>) -> bool {
    Hold::try_reserve(ledger, black_box(ESTIMATE)).is_some_and(|hold| {
        hold.record(ledger, black_box(PROMPT), black_box(COMPLETION))
            .is_ok()
    })
}

fn hold_refund(ledger: &Arc<TokenLedger>) -> bool {
    Hold::try_reserve(ledger, black_box(ESTIMATE)).is_some_and(|hold| hold.refund())
}

fn mutex_pair(budget: &MutexBudget) -> bool {
    let granted = budget.try_reserve(black_box(COST));
    if granted {
        budget.release(black_box(COST));
    }
    granted
}

fn fetch_add_pair(counter: &AtomicU64) -> bool {
    black_box(counter.fetch_add(black_box(COST), Ordering::AcqRel));
    black_box(counter.fetch_sub(black_box(COST), Ordering::AcqRel));
    true
}

/// Runs `pair` `iters` times on each of `threads` threads sharing `shared`, and returns the
/// wall time from the first thread leaving the start barrier to the last one finishing, with
/// the number of denied reserves.
///
/// Threads are spawned (and joined) outside the timed span. Criterion divides the returned
/// time by `iters`, so the reported number is the wall time for *each* of the N threads to get
/// one pair done while the others do the same: the per-thread latency of a pair under N-way
/// contention. Aggregate throughput is N pairs per that time (criterion's `thrpt` line, in
/// pairs per second across all threads). With no contention at all and N at most the number of
/// cores it would stay flat; past the core count threads time-share, so it grows at least as
/// N / cores even for independent work. Criterion's linear regression over `iters` removes the
/// constant barrier and wake-up skew.
fn contended<S: Sync>(
    shared: &S,
    threads: usize,
    iters: u64,
    pair: impl Fn(&S) -> bool + Sync,
) -> (Duration, u64) {
    let barrier = &Barrier::new(threads);
    let pair = &pair;
    let spans: Vec<(Instant, Instant, u64)> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let mut denied = 0u64;
                    for _ in 0..iters {
                        if !pair(shared) {
                            denied += 1;
                        }
                    }
                    (start, Instant::now(), denied)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = spans.iter().map(|s| s.0).min().unwrap();
    let last = spans.iter().map(|s| s.1).max().unwrap();
    (last - first, spans.iter().map(|s| s.2).sum())
}

fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("uncontended");

    let budget = UnitBudget::new(ROOMY);
    group.bench_function("unit_pair", |b| b.iter(|| assert!(unit_pair(&budget))));

    let ledger = TokenLedger::new(MAX_TOKEN_CAPACITY);
    group.bench_function("token_pair", |b| b.iter(|| assert!(token_pair(&ledger))));

    let ledger = Arc::new(TokenLedger::new(MAX_TOKEN_CAPACITY));
    group.bench_function("hold_record", |b| {
        b.iter(|| assert!(hold_record(&ledger)));
    });

    let ledger = Arc::new(TokenLedger::new(MAX_TOKEN_CAPACITY));
    group.bench_function("hold_refund", |b| {
        b.iter(|| assert!(hold_refund(&ledger)));
    });

    let budget = MutexBudget::new(ROOMY);
    group.bench_function("mutex_pair", |b| b.iter(|| assert!(mutex_pair(&budget))));

    let counter = AtomicU64::new(0);
    group.bench_function("fetch_add_pair", |b| {
        b.iter(|| assert!(fetch_add_pair(&counter)));
    });

    group.finish();
}

/// Benches `pair` on one fresh `shared` per thread count; every reserve must be granted.
fn contended_case<S: Sync>(
    c: &mut Criterion,
    name: &str,
    make: impl Fn() -> S,
    pair: impl Fn(&S) -> bool + Sync + Copy,
) {
    let mut group = c.benchmark_group("contended");
    for threads in THREADS {
        let shared = make();
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(BenchmarkId::new(name, threads), |b| {
            b.iter_custom(|iters| {
                let (wall, denied) = contended(&shared, threads, iters, pair);
                assert_eq!(denied, 0, "{name}: the success path was left");
                wall
            });
        });
    }
    group.finish();
}

/// One unit shared by 2, 4 and 8 threads: the unit pair with denials.
fn contended_scarce(c: &mut Criterion) {
    let name = "unit_pair_scarce";
    let mut group = c.benchmark_group("contended");
    for threads in [2, 4, 8] {
        let budget = UnitBudget::new(COST);
        let (attempts, denials) = (AtomicU64::new(0), AtomicU64::new(0));
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(BenchmarkId::new(name, threads), |b| {
            b.iter_custom(|iters| {
                let (wall, denied) = contended(&budget, threads, iters, unit_pair);
                attempts.fetch_add(iters * threads as u64, Ordering::Relaxed);
                denials.fetch_add(denied, Ordering::Relaxed);
                wall
            });
        });
        let (attempts, denials) = (attempts.into_inner(), denials.into_inner());
        if attempts > 0 {
            let permille = u128::from(denials) * 1000 / u128::from(attempts);
            eprintln!(
                "contended/{name}/{threads}: {}.{}% of {attempts} reserves denied\n",
                permille / 10,
                permille % 10
            );
        }
    }
    group.finish();
}

fn contended_all(c: &mut Criterion) {
    contended_case(c, "unit_pair", || UnitBudget::new(ROOMY), unit_pair);
    contended_case(c, "mutex_pair", || MutexBudget::new(ROOMY), mutex_pair);
    contended_case(c, "fetch_add_pair", || AtomicU64::new(0), fetch_add_pair);
    contended_scarce(c);
}

/// Normal settings keep the whole run near two minutes; `COSTBOUND_BENCH_SMOKE` makes it a
/// few seconds. Command-line options (`--warm-up-time`, ...) still override both.
fn config() -> Criterion {
    let criterion = Criterion::default();
    if std::env::var_os("COSTBOUND_BENCH_SMOKE").is_some() {
        criterion
            .warm_up_time(Duration::from_millis(10))
            .measurement_time(Duration::from_millis(50))
            .sample_size(10)
    } else {
        criterion
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = uncontended, contended_all
}
criterion_main!(benches);
