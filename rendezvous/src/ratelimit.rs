//! Per-source token buckets with a bounded table, so that neither a flood from one address
//! nor a flood from many (spoofed) addresses can make a UDP service answer without limit or
//! grow its memory. Sans-IO: `now` comes in.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// A bounded table of token buckets keyed by source.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `rate` tokens per second sustained, `burst` at most at once, `max_keys` sources tracked.
    pub fn new(rate: u32, burst: u32, max_keys: usize) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key`; false when its bucket is empty.
    pub fn allow(&mut self, now: Instant, key: &K) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.make_room(now);
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Drops buckets that have refilled (they carry no information); if none has, drops
    /// half the table. Amortised O(1) per new key because it frees many slots at once.
    fn make_room(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
        });
        if self.buckets.len() >= self.max_keys {
            let mut drop = self.buckets.len() / 2;
            self.buckets.retain(|_, _| {
                if drop > 0 {
                    drop -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10, 5, 100);
        let allowed = (0..20).filter(|_| rl.allow(t0, &1u32)).count();
        assert_eq!(allowed, 5);
        // A second later, ten more tokens but never above the burst.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..20).filter(|_| rl.allow(t1, &1u32)).count(), 5);
        // 100 ms later: one token.
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!((0..20).filter(|_| rl.allow(t2, &1u32)).count(), 1);
        // Another source is independent.
        assert!(rl.allow(t2, &2u32));
    }

    #[test]
    fn table_stays_bounded_under_many_sources() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1, 1, 64);
        for k in 0..10_000u32 {
            rl.allow(t0, &k);
            assert!(rl.len() <= 64);
        }
    }
}
