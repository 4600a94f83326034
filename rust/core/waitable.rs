//! What waiting needs of a budget, written once for both: a [`Ledger`] gives four primitives,
//! and every budget that is one is [`Waitable`] (its queue, its watchers, its refill timers).

use std::sync::Arc;

use super::clock::Wake;
use super::queue::{WaitQueue, Waiter};
use super::rate::Refill;

/// The primitives of a budget with a wait queue: [`UnitBudget`](super::UnitBudget) and
/// [`TokenLedger`](super::TokenLedger).
pub trait Ledger: Send + Sync {
    /// The most that can ever fit.
    fn capacity(&self) -> u64;
    /// The budget's queue of waiters and watchers.
    fn queue(&self) -> &WaitQueue;
    /// The rate word, if units flow back over time.
    fn refill_word(&self) -> Option<&Refill>;
    /// Takes `cost` if it fits, queue or not: the queue's own grant.
    fn take(&self, cost: u64) -> bool;
    /// Gives back a cost that was taken, and grants the waiters that then fit.
    fn give_back(&self, cost: u64);
    /// Whether `amount` would fit now, queue aside (nothing changes).
    fn has_room(&self, amount: u64) -> bool;
}

/// Waiting on a [`Ledger`]: implemented for every one of them.
pub trait Waitable: Ledger {
    /// Takes `cost` if it fits and no one waits in the queue; otherwise changes nothing.
    fn try_reserve(&self, cost: u64) -> bool {
        self.queue().is_empty() && self.take(cost)
    }

    /// Whether a non-waiting reservation of `amount` would be granted now (nothing changes).
    fn fits(&self, amount: u64) -> bool {
        self.queue().is_empty() && self.has_room(amount)
    }

    /// How many wait in the queue.
    fn waiters(&self) -> usize {
        self.queue().len()
    }

    /// How many watch.
    fn watchers(&self) -> usize {
        self.queue().watchers()
    }

    /// Whether new heads of the queue must be told to set a timer for the refill.
    fn timed(&self) -> bool {
        self.refill_word().is_some_and(|r| !r.clock().is_manual())
    }

    /// Grants the waiters that fit now, in order, and wakes the watchers. Every change that adds
    /// room calls it; it costs one load when no one waits or watches.
    fn drain(&self) {
        self.queue().drain(|cost| self.take(cost), self.timed());
    }

    /// Queues `waiter` behind those already waiting; it is granted (its cost taken) as soon as
    /// it is first in line and fits, possibly at once.
    fn enqueue(&self, waiter: Arc<Waiter>) {
        self.queue()
            .enqueue(waiter, |cost| self.take(cost), self.timed());
    }

    /// Takes `waiter` out of the queue. Returns `true` if it had been granted first, in which
    /// case its cost is the caller's (to keep, or to [`give_back`](Ledger::give_back)).
    fn cancel(&self, waiter: &Arc<Waiter>) -> bool {
        self.queue()
            .cancel(waiter, |cost| self.take(cost), self.timed())
    }

    /// Wakes `watcher` (never granting it anything) at every later change that adds room or
    /// shortens the queue, until [`unwatch`](Self::unwatch).
    fn watch(&self, watcher: Arc<Waiter>) {
        self.queue().watch(watcher);
    }

    /// Stops waking `watcher`.
    fn unwatch(&self, watcher: &Arc<Waiter>) {
        self.queue().unwatch(watcher);
    }

    /// Nanoseconds until `waiter`, if first in line, fits by the rate refill alone; `None` if it
    /// is not first, or only another event (a release, a refill, a clock advance) can fit it.
    fn nanos_until_fits(&self, waiter: &Arc<Waiter>) -> Option<u64> {
        let refill = self.refill_word()?;
        if !self.queue().is_head(waiter) {
            return None;
        }
        refill.nanos_until(waiter.cost())
    }

    /// Nanoseconds until the rate refill alone makes `amount` available to a non-waiting
    /// reservation: `None` without a rate, on a manual clock, above the capacity, or while
    /// waiters are queued (the one that leaves the queue, served or not, wakes the watchers).
    fn nanos_until_available(&self, amount: u64) -> Option<u64> {
        if !self.queue().is_empty() {
            return None;
        }
        self.refill_word()?.nanos_until(amount)
    }
}

impl<T: Ledger + ?Sized> Waitable for T {}

impl<T: Ledger> Wake for T {
    fn wake_waiters(&self) {
        self.drain();
    }
}
