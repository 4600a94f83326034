//! The first-come, first-served queue of waiters a budget grants in order.
//!
//! The queue is the slow path: a mutex around a deque, touched only when a request does not
//! fit. The fast path sees it as one counter: a non-waiting reservation is refused while any
//! waiter is queued (so it cannot jump the queue), and a change that adds room (a release, a
//! refund, a settlement, a refill) looks at the queue only when that counter is not zero.
//!
//! No wake-up is lost between a waiter that queues and a release that runs at the same time:
//! the waiter counts itself and then tries the budget, the releaser changes the budget and then
//! reads the count, all `SeqCst`; in any interleaving one of them sees the other.
//!
//! Besides waiters, the queue keeps *watchers*: they take no place in line and are never granted
//! anything, but are woken by every change that adds room or shortens the queue. An admission
//! across several budgets watches them all and retries, so that it never sits in one budget's
//! line while holding another's (which can livelock two admissions of opposite orders).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use super::sync::{AtomicU8, AtomicUsize, Mutex, Ordering, lock, order_fence};

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const CANCELLED: u8 = 2;

/// One queued request: its cost, whether it was granted, and how to wake whoever waits on it.
pub struct Waiter {
    cost: u64,
    state: AtomicU8,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl fmt::Debug for Waiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter")
            .field("cost", &self.cost)
            .field("state", &self.state.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Waiter {
    /// A request for `cost` whose `wake` is called (never under a lock) when it is granted, or
    /// when it becomes the head of the queue and may need to set a timer.
    pub fn new(cost: u64, wake: impl Fn() + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            cost,
            state: AtomicU8::new(WAITING),
            wake: Box::new(wake),
        })
    }

    /// The cost it waits for.
    #[must_use]
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// Whether the queue has granted it (taken its cost from the budget on its behalf).
    #[must_use]
    pub fn is_granted(&self) -> bool {
        self.state.load(Ordering::SeqCst) == GRANTED
    }
}

/// Waiters in arrival order, and watchers. Generic over the budget: the caller passes the grant
/// (`take`).
#[derive(Debug, Default)]
pub struct WaitQueue {
    /// Waiters in line: what a non-waiting reservation checks.
    queued: AtomicUsize,
    /// Waiters in line plus watchers: what a change that adds room checks.
    interested: AtomicUsize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    waiters: VecDeque<Arc<Waiter>>,
    watchers: Vec<Arc<Waiter>>,
}

impl WaitQueue {
    /// An empty queue.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no one waits: the fast path's check.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.queued.load(Ordering::SeqCst) == 0
    }

    /// How many wait.
    #[must_use]
    pub fn len(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// How many watch. Counted under the lock, not as `interested - queued`: those are two
    /// loads, between which a waiter can be queued or granted, so their difference can be wrong
    /// or even negative. Only a diagnostic reads it, never the fast path.
    #[must_use]
    pub fn watchers(&self) -> usize {
        lock(&self.inner).watchers.len()
    }

    /// Whether `waiter` is first in line.
    #[must_use]
    pub fn is_head(&self, waiter: &Arc<Waiter>) -> bool {
        lock(&self.inner)
            .waiters
            .front()
            .is_some_and(|head| Arc::ptr_eq(head, waiter))
    }

    /// Makes `watcher` woken by every later change that adds room or shortens the line, until
    /// [`unwatch`](Self::unwatch). Register before trying the budget, so that no change between
    /// the try and the wait goes unseen.
    pub fn watch(&self, watcher: Arc<Waiter>) {
        let mut inner = lock(&self.inner);
        inner.watchers.push(watcher);
        self.interested.fetch_add(1, Ordering::SeqCst);
        order_fence();
    }

    /// Stops waking `watcher`.
    pub fn unwatch(&self, watcher: &Arc<Waiter>) {
        let mut inner = lock(&self.inner);
        if let Some(index) = inner.watchers.iter().position(|w| Arc::ptr_eq(w, watcher)) {
            let _ = inner.watchers.swap_remove(index);
            self.interested.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Queues `waiter` last, then grants whatever fits (it may be granted at once). A waiter
    /// that is not granted and is the head sets its own timer, so it is not woken for that.
    pub fn enqueue(&self, waiter: Arc<Waiter>, take: impl FnMut(u64) -> bool, poke: bool) {
        let woken = {
            let mut inner = lock(&self.inner);
            inner.waiters.push_back(waiter);
            self.queued.fetch_add(1, Ordering::SeqCst);
            self.interested.fetch_add(1, Ordering::SeqCst);
            order_fence();
            self.grant(&mut inner, take, poke, false)
        };
        wake(woken);
    }

    /// Grants waiters from the head while their costs fit. Called after every change that adds
    /// room; costs one load when no one waits. With `poke` (a budget with a rate), a waiter that
    /// becomes the head is woken too, so that it can set a timer for when the refill fits it.
    pub fn drain(&self, take: impl FnMut(u64) -> bool, poke: bool) {
        order_fence();
        if self.interested.load(Ordering::SeqCst) == 0 {
            return;
        }
        let woken = {
            let mut inner = lock(&self.inner);
            self.grant(&mut inner, take, poke, true)
        };
        wake(woken);
    }

    /// Takes `waiter` out of the queue. Returns `true` if it had already been granted: its cost
    /// was taken on its behalf and the caller must give it back. If it was the head, the waiters
    /// behind it are granted as far as they now fit.
    pub fn cancel(&self, waiter: &Arc<Waiter>, take: impl FnMut(u64) -> bool, poke: bool) -> bool {
        let woken = {
            let mut inner = lock(&self.inner);
            if waiter.is_granted() {
                return true;
            }
            let Some(index) = inner.waiters.iter().position(|w| Arc::ptr_eq(w, waiter)) else {
                return false; // already cancelled
            };
            let _ = inner.waiters.remove(index);
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.interested.fetch_sub(1, Ordering::SeqCst);
            waiter.state.store(CANCELLED, Ordering::SeqCst);
            // A shorter line may let a watcher's try through; a new head may fit now.
            let mut woken = if index == 0 {
                self.grant(&mut inner, take, poke, true)
            } else {
                inner.watchers.clone()
            };
            if index == 0 && poke && !woken.iter().any(|w| w.is_granted()) {
                woken.extend(inner.waiters.front().cloned());
            }
            woken
        };
        wake(woken);
        false
    }

    /// Grants from the head under the lock and returns whom to wake once it is released: the
    /// granted; with `poke` the new head, which may have to set a timer for a rate refill; and
    /// with `watchers` every watcher.
    fn grant(
        &self,
        inner: &mut Inner,
        mut take: impl FnMut(u64) -> bool,
        poke: bool,
        watchers: bool,
    ) -> Vec<Arc<Waiter>> {
        let mut woken = Vec::new();
        while let Some(head) = inner.waiters.front() {
            if !take(head.cost) {
                break;
            }
            head.state.store(GRANTED, Ordering::SeqCst);
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.interested.fetch_sub(1, Ordering::SeqCst);
            woken.extend(inner.waiters.pop_front());
        }
        if poke && !woken.is_empty() {
            woken.extend(inner.waiters.front().cloned());
        }
        if watchers {
            woken.extend(inner.watchers.iter().cloned());
        }
        woken
    }
}

fn wake(woken: Vec<Arc<Waiter>>) {
    for waiter in woken {
        (waiter.wake)();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::{WaitQueue, Waiter};

    #[test]
    fn watchers_counts_only_watchers_while_waiters_come_and_go() {
        let queue = Arc::new(WaitQueue::new());
        let done = Arc::new(AtomicBool::new(false));
        let churn = {
            let (queue, done) = (queue.clone(), done.clone());
            std::thread::spawn(move || {
                // Waiters queued and granted (or cancelled) as fast as possible, watchers never.
                for i in 0..200_000u64 {
                    let waiter = Waiter::new(1, || {});
                    queue.enqueue(waiter.clone(), |_| i % 2 == 0, false);
                    queue.cancel(&waiter, |_| false, false);
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let watcher = Waiter::new(0, || {});
        queue.watch(watcher.clone());
        let mut reads = 0u64;
        while !done.load(Ordering::SeqCst) {
            assert_eq!(queue.watchers(), 1, "after {reads} reads");
            reads += 1;
        }
        churn.join().unwrap();
        queue.unwatch(&watcher);
        assert_eq!((queue.watchers(), queue.len()), (0, 0));
    }
}
