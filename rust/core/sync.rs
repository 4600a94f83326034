//! Atomics and locks, swapped for loom's model-checked ones under `--cfg loom`.

#[cfg(loom)]
pub(crate) use loom::sync::Mutex;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering,
};
#[cfg(not(loom))]
pub(crate) use std::sync::Mutex;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering,
};

#[cfg(not(loom))]
pub(crate) use portable_atomic::AtomicI128;

/// The total order that the waiter check relies on. A `SeqCst` read-modify-write followed by a
/// `SeqCst` load on another location already forbids the store-buffering outcome in the C++
/// model and on every target, so this is empty there; loom treats `SeqCst` accesses as
/// `AcqRel` and needs the fence to explore the same executions.
#[inline]
pub(crate) fn order_fence() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

/// Locks `mutex`; a panic while it was held (none can happen) leaves valid data behind.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> impl std::ops::DerefMut<Target = T> + '_ {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// loom has no 128-bit atomics: a lock-based stand-in with the same interface, enough for the
/// models (the rate word's logic is the same compare-and-swap loop as the 64-bit words').
#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct AtomicI128(loom::sync::Mutex<i128>);

#[cfg(loom)]
impl AtomicI128 {
    pub(crate) fn new(value: i128) -> Self {
        Self(loom::sync::Mutex::new(value))
    }

    pub(crate) fn load(&self, _: Ordering) -> i128 {
        *lock(&self.0)
    }

    pub(crate) fn store(&self, value: i128, _: Ordering) {
        *lock(&self.0) = value;
    }

    pub(crate) fn compare_exchange_weak(
        &self,
        current: i128,
        new: i128,
        _: Ordering,
        _: Ordering,
    ) -> Result<i128, i128> {
        let mut value = lock(&self.0);
        if *value == current {
            *value = new;
            Ok(current)
        } else {
            Err(*value)
        }
    }
}
