//! Continuous refill at a rate, computed lazily from a clock: one 128-bit word, no drift.
//!
//! The word does not store the balance but `w = r·t − b`, in fixed point: `r·t` is the refill
//! that would have flowed since the clock's origin and `b` the balance. Read at time `t`, the
//! balance is `min(cap, r·t − w)`. Refill therefore needs no write at all, fractions of a unit
//! are never rounded away however often the word is read, and every change (take, give back,
//! settle) moves `w` by an exact amount with one compare-and-swap. The only approximation is the
//! rate itself, rounded up to `2^-32` units per second (coarser only above `2^30` units/s).

use std::fmt;

use super::clock::Clock;
use super::sync::{AtomicI128, Ordering};

/// The largest rate accepted, in units per second (`2**40`, about 1.1e12).
pub const MAX_RATE: f64 = 1_099_511_627_776.0;

const NANOS_PER_SECOND: i128 = 1_000_000_000;

/// Why a rate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateError {
    /// Below zero.
    Negative,
    /// NaN or infinite.
    NotFinite,
    /// Above [`MAX_RATE`].
    TooLarge,
}

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Negative => "rate must not be negative",
            Self::NotFinite => "rate must be a finite number",
            Self::TooLarge => "rate must be at most 2**40 units per second",
        })
    }
}

impl std::error::Error for RateError {}

/// A balance that refills at a constant rate up to a cap, and never below a floor.
#[derive(Debug)]
pub struct Refill {
    /// `r·t − b`, in scaled units.
    word: AtomicI128,
    /// Scaled units that flow back per nanosecond.
    per_ns: i128,
    /// Scaled units per unit: `10^9 · 2^shift`.
    scale: i128,
    cap: i128,
    floor: i128,
    clock: Clock,
    rate: f64,
}

impl Refill {
    /// A full balance of `cap` units refilling at `rate` units per second, or `None` for a rate
    /// of zero (nothing to compute). `floor` is the lowest balance (a debt limit, or zero).
    pub fn new(rate: f64, cap: i128, floor: i128, clock: Clock) -> Result<Option<Self>, RateError> {
        if rate.is_nan() || rate.is_infinite() {
            return Err(RateError::NotFinite);
        }
        if rate < 0.0 {
            return Err(RateError::Negative);
        }
        if rate > MAX_RATE {
            return Err(RateError::TooLarge);
        }
        if rate == 0.0 {
            return Ok(None);
        }
        // The most fractional bits (up to 32) that keep `rate · 2^shift` below 2^62, so that
        // `per_ns · t` stays far inside an i128 for centuries of nanoseconds.
        let mut shift = 32;
        while rate * 2f64.powi(shift) >= 4_611_686_018_427_387_904.0 {
            shift -= 1;
        }
        // `rate · 2^shift` is exact in floating point (a power of two); rounding it up is the only
        // approximation, so that a budget is never later than its rate: 100 / 60 units per
        // second gives 100 units after 60 s, not 99.
        #[allow(clippy::cast_possible_truncation)] // below 2^62 by the loop above
        let per_ns = (rate * 2f64.powi(shift)).ceil() as i128;
        let scale = NANOS_PER_SECOND << shift;
        let refill = Self {
            word: AtomicI128::new(0),
            per_ns,
            scale,
            cap: cap.saturating_mul(scale),
            floor: floor.saturating_mul(scale),
            clock,
            rate,
        };
        let now = refill.now();
        refill.word.store(now - refill.cap, Ordering::SeqCst);
        Ok(Some(refill))
    }

    /// The rate in units per second, as given.
    #[must_use]
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The clock the refill reads.
    #[must_use]
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// `r·t` now, in scaled units.
    fn now(&self) -> i128 {
        i128::from(self.clock.now_ns()) * self.per_ns
    }

    /// The scaled balance that `word` means at `now`, capped.
    fn scaled(&self, word: i128, now: i128) -> i128 {
        (now - word).min(self.cap)
    }

    /// The balance now, in whole units (rounded down: a fraction is not yet a unit).
    #[must_use]
    pub fn balance(&self) -> i128 {
        let word = self.word.load(Ordering::SeqCst);
        self.scaled(word, self.now()).div_euclid(self.scale)
    }

    /// Moves the word with `change(balance) -> new balance` (scaled), or leaves it when `change`
    /// declines. Returns whether it moved.
    fn update(&self, change: impl Fn(i128) -> Option<i128>) -> bool {
        let mut word = self.word.load(Ordering::SeqCst);
        loop {
            let now = self.now();
            let Some(balance) = change(self.scaled(word, now)) else {
                return false;
            };
            let balance = balance.clamp(self.floor, self.cap);
            match self.word.compare_exchange_weak(
                word,
                now - balance,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(current) => word = current,
            }
        }
    }

    /// Takes `amount` units if the balance holds that many whole units.
    pub fn try_take(&self, amount: u64) -> bool {
        let amount = i128::from(amount) * self.scale;
        self.update(|balance| (balance >= amount).then(|| balance - amount))
    }

    /// Adds `delta` units (negative to charge), capped and floored.
    pub fn adjust(&self, delta: i128) {
        let delta = delta.saturating_mul(self.scale);
        self.update(|balance| Some(balance.saturating_add(delta)));
    }

    /// Sets the balance to exactly `value` units (capped and floored).
    pub fn set(&self, value: i128) {
        let value = value.saturating_mul(self.scale);
        self.update(|_| Some(value));
    }

    /// Nanoseconds until the balance holds `amount` whole units if nothing else changes it:
    /// `Some(0)` if it does now, `None` if it never will (above the cap) or if the clock is a
    /// manual one, whose advances wake waiters themselves.
    #[must_use]
    pub fn nanos_until(&self, amount: u64) -> Option<u64> {
        let amount = i128::from(amount) * self.scale;
        if amount > self.cap || self.clock.is_manual() {
            return None;
        }
        let word = self.word.load(Ordering::SeqCst);
        let short = amount - self.scaled(word, self.now());
        if short <= 0 {
            return Some(0);
        }
        // Rounded up, and one clock tick later, so that a timer set for it never fires before
        // the clock shows enough.
        let nanos = (short + self.per_ns - 1) / self.per_ns;
        Some(
            u64::try_from(nanos)
                .unwrap_or(u64::MAX)
                .saturating_add(self.clock.resolution_ns()),
        )
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;

    use super::{Clock, MAX_RATE, RateError, Refill};
    use crate::core::ManualClock;

    fn manual(rate: f64, cap: i128, floor: i128) -> (Refill, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let refill = Refill::new(rate, cap, floor, Clock::Manual(clock.clone()))
            .unwrap()
            .unwrap();
        (refill, clock)
    }

    #[test]
    fn rates_are_checked() {
        let clock = Clock::monotonic;
        assert_eq!(
            Refill::new(-1.0, 1, 0, clock()).unwrap_err(),
            RateError::Negative
        );
        assert_eq!(
            Refill::new(f64::NAN, 1, 0, clock()).unwrap_err(),
            RateError::NotFinite
        );
        assert_eq!(
            Refill::new(f64::INFINITY, 1, 0, clock()).unwrap_err(),
            RateError::NotFinite
        );
        assert_eq!(
            Refill::new(MAX_RATE * 2.0, 1, 0, clock()).unwrap_err(),
            RateError::TooLarge
        );
        assert!(Refill::new(0.0, 1, 0, clock()).unwrap().is_none());
        assert!(
            Refill::new(MAX_RATE, 1 << 64, 0, clock())
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn refills_continuously_up_to_the_cap() {
        let (r, clock) = manual(1_500.0, 90_000, 0);
        assert!(r.try_take(90_000));
        assert_eq!(r.balance(), 0);
        clock.advance(1_000_000_000);
        assert_eq!(r.balance(), 1_500);
        clock.advance(3_600 * 1_000_000_000);
        assert_eq!(r.balance(), 90_000, "capped");
    }

    #[test]
    fn fractions_are_carried_however_often_it_is_read() {
        // One unit every 3 seconds, read every millisecond for 30 seconds: exactly 10 units.
        let (r, clock) = manual(1.0 / 3.0, 100, 0);
        assert!(r.try_take(100));
        for _ in 0..30_000 {
            clock.advance(1_000_000);
            let _ = r.balance();
            let _ = r.try_take(0);
        }
        assert_eq!(r.balance(), 10);
    }

    #[test]
    fn a_rate_given_as_a_fraction_is_on_time() {
        let (r, clock) = manual(100.0 / 60.0, 100, 0);
        assert!(r.try_take(100));
        clock.advance(59_990_000_000);
        assert_eq!(r.balance(), 99);
        clock.advance(10_000_000);
        assert_eq!(r.balance(), 100);
    }

    #[test]
    fn takes_at_sub_unit_steps_lose_nothing() {
        // 7 units per second, a unit taken whenever one is whole, 1 ms steps for 100 s: 700.
        let (r, clock) = manual(7.0, 10, 0);
        assert!(r.try_take(10));
        let mut taken = 0;
        for _ in 0..100_000 {
            clock.advance(1_000_000);
            while r.try_take(1) {
                taken += 1;
            }
        }
        assert_eq!(taken, 700);
    }

    #[test]
    fn debt_is_paid_before_anything_is_available() {
        let (r, clock) = manual(10.0, 100, i128::from(i64::MIN));
        r.adjust(-150); // 100 - 150: a debt of 50
        assert_eq!(r.balance(), -50);
        assert!(!r.try_take(0));
        clock.advance(5_000_000_000);
        assert_eq!(r.balance(), 0);
        clock.advance(1_000_000_000);
        assert_eq!(r.balance(), 10);
    }

    #[test]
    fn nanos_until_is_exact_and_rounded_up() {
        let (r, clock) = manual(3.0, 10, 0);
        assert!(r.try_take(10));
        // Manual clocks give no timers; the same word on the monotonic clock does.
        assert_eq!(r.nanos_until(1), None);
        let m = Refill::new(3.0, 10, 0, Clock::monotonic())
            .unwrap()
            .unwrap();
        assert_eq!(m.nanos_until(11), None, "above the cap");
        assert_eq!(m.nanos_until(0), Some(0));
        assert!(m.try_take(10));
        let wait = m.nanos_until(3).unwrap();
        let tick = Clock::monotonic().resolution_ns();
        assert!(wait > 900_000_000 && wait <= 1_000_000_000 + tick, "{wait}");
        clock.advance(333_333_334);
        assert_eq!(r.balance(), 1);
    }

    #[test]
    fn set_and_floor() {
        let (r, _clock) = manual(1.0, 100, 0);
        r.adjust(-1_000);
        assert_eq!(r.balance(), 0, "floored at zero");
        r.set(40);
        assert_eq!(r.balance(), 40);
        r.adjust(1_000);
        assert_eq!(r.balance(), 100, "capped");
    }

    #[test]
    fn extreme_capacity_and_rate_fit() {
        let (r, clock) = manual(MAX_RATE, i128::from(u64::MAX), 0);
        assert!(r.try_take(u64::MAX));
        clock.advance(u64::MAX);
        assert_eq!(r.balance(), i128::from(u64::MAX));
    }
}
