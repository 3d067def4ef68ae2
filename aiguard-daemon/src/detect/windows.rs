//! The counters detectors keep per source prefix and per key: events in a sliding window, and
//! the distinct things seen in one, both in constant memory.
use rustc_hash::FxHashMap;

/// Events in the last `window`, estimated from two fixed windows: the previous one weighted by
/// the share of it the sliding window still covers (as Cloudflare's and nginx's rate counters
/// do). Off by at most the previous window's skew; two integers per counter.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlidingCount {
    start_ms: u64,
    current: u32,
    previous: u32,
}

impl SlidingCount {
    fn roll(&mut self, now_ms: u64, window_ms: u64) {
        if self.start_ms == 0 {
            self.start_ms = now_ms;
            return;
        }
        let elapsed = now_ms.saturating_sub(self.start_ms);
        if elapsed < window_ms {
            return;
        }
        let windows = elapsed / window_ms;
        self.previous = if windows == 1 { self.current } else { 0 };
        self.current = 0;
        self.start_ms += windows * window_ms;
    }

    /// Counts `n` events now; returns the window's estimate with them.
    pub fn add(&mut self, now_ms: u64, window_ms: u64, n: u32) -> f64 {
        self.roll(now_ms, window_ms);
        self.current = self.current.saturating_add(n);
        self.estimate(now_ms, window_ms)
    }

    pub fn estimate(&self, now_ms: u64, window_ms: u64) -> f64 {
        let elapsed = now_ms.saturating_sub(self.start_ms);
        if elapsed >= 2 * window_ms {
            return 0.0;
        }
        let (previous, current) = if elapsed >= window_ms {
            (self.current, 0)
        } else {
            (self.previous, self.current)
        };
        let into = (elapsed % window_ms) as f64 / window_ms as f64;
        f64::from(previous) * (1.0 - into) + f64::from(current)
    }

    /// Events in the fixed window before the current one, once it is over (for baselines).
    pub fn closed_window(&mut self, now_ms: u64, window_ms: u64) -> Option<u32> {
        let before = self.start_ms;
        self.roll(now_ms, window_ms);
        (self.start_ms != before && before != 0).then_some(self.previous)
    }
}

/// Distinct items (hashed) seen within a window, remembering at most `cap`: a detector only
/// needs to know whether more than its threshold were seen, so it never keeps more.
#[derive(Debug, Clone, Default)]
pub struct RecentSet {
    last_seen: FxHashMap<u64, u64>,
}

impl RecentSet {
    /// Notes `item` now; returns how many distinct items the window holds (at most `cap`).
    pub fn note(&mut self, item: u64, now_ms: u64, window_ms: u64, cap: usize) -> usize {
        if let Some(seen) = self.last_seen.get_mut(&item) {
            *seen = now_ms;
            return self.last_seen.len();
        }
        if self.last_seen.len() >= cap {
            let oldest = now_ms.saturating_sub(window_ms);
            self.last_seen.retain(|_, seen| *seen > oldest);
        }
        if self.last_seen.len() < cap {
            self.last_seen.insert(item, now_ms);
        }
        self.last_seen.len()
    }

    pub fn forget_before(&mut self, oldest_ms: u64) {
        self.last_seen.retain(|_, seen| *seen > oldest_ms);
    }

    pub fn is_empty(&self) -> bool {
        self.last_seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sliding_count_weighs_the_previous_window_by_its_overlap() {
        let mut c = SlidingCount::default();
        let w = 1_000;
        for t in 0..10 {
            c.add(1_000 + t, w, 1);
        }
        assert_eq!(c.estimate(1_500, w), 10.0);
        // Half-way into the next window: half of the previous one still counts.
        assert_eq!(c.add(2_500, w, 1), 6.0);
        // Two windows later nothing is left.
        assert_eq!(c.estimate(4_100, w), 0.0);
        assert_eq!(c.add(9_000, w, 2), 2.0);
    }

    #[test]
    fn a_closed_window_reports_its_count_once() {
        let mut c = SlidingCount::default();
        c.add(1_000, 1_000, 5);
        assert_eq!(c.closed_window(1_500, 1_000), None);
        assert_eq!(c.closed_window(2_100, 1_000), Some(5));
        assert_eq!(c.closed_window(2_200, 1_000), None);
    }

    #[test]
    fn a_recent_set_counts_distinct_items_and_keeps_at_most_its_cap() {
        let mut s = RecentSet::default();
        assert_eq!(s.note(1, 0, 100, 3), 1);
        assert_eq!(s.note(1, 10, 100, 3), 1);
        assert_eq!(s.note(2, 20, 100, 3), 2);
        assert_eq!(s.note(3, 30, 100, 3), 3);
        assert_eq!(s.note(4, 40, 100, 3), 3);
        // Items older than the window make room (1 and 2 go, 3 stays).
        assert_eq!(s.note(5, 125, 100, 3), 2);
        s.forget_before(1_000);
        assert!(s.is_empty());
    }
}
