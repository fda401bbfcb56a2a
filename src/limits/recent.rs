//! Event counts over the last few seconds, for the status page: one lock-free slot per second in a
//! small ring, so counting is one or two relaxed atomic operations and reading sums a dozen words.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How many complete seconds [`RecentCounts::sum`] covers.
pub const WINDOW_SECS: u64 = 10;

/// Two more slots than the window: the second being counted now, and one being reused while a
/// reader sums the window, never overlap the window.
const SLOTS: usize = WINDOW_SECS as usize + 2;

const COUNT_MASK: u64 = 0xFFFF_FFFF;

/// Counts of events per second for the last [`WINDOW_SECS`] seconds.
///
/// Seconds are whatever the caller counts from (the owner's clock since its creation). Each slot
/// packs the second it counts (low 32 bits of it, high half of the word) and the count (low
/// half), so a slot is reset for a new second by one compare-and-swap, without a lock.
#[derive(Debug, Default)]
pub struct RecentCounts {
    slots: [AtomicU64; SLOTS],
}

impl RecentCounts {
    /// Counts one event in `second`.
    pub fn add(&self, second: u64) {
        let slot = &self.slots[slot_index(second)];
        let tag = tag_of(second);
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let current_tag = current & !COUNT_MASK;
            if current_tag == tag {
                // A count cannot reach 2^32 in one second; the guard keeps it from spilling
                // into the tag if something ever did.
                if current & COUNT_MASK != COUNT_MASK {
                    slot.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            if is_newer(current_tag, tag) {
                // A caller delayed for a whole ring: its second is gone, and so is its event.
                return;
            }
            match slot.compare_exchange_weak(current, tag | 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// The events of the complete seconds before `now_second`, at most [`WINDOW_SECS`] of them,
    /// and the window they cover (shorter than [`WINDOW_SECS`] seconds right after the start).
    pub fn sum(&self, now_second: u64) -> (u64, Duration) {
        let first = now_second.saturating_sub(WINDOW_SECS);
        let total = (first..now_second)
            .map(|second| {
                let value = self.slots[slot_index(second)].load(Ordering::Relaxed);
                if value & !COUNT_MASK == tag_of(second) {
                    value & COUNT_MASK
                } else {
                    0
                }
            })
            .sum();
        (total, Duration::from_secs(now_second - first))
    }
}

fn slot_index(second: u64) -> usize {
    // The remainder is below SLOTS, so the cast cannot truncate.
    (second % SLOTS as u64) as usize
}

fn tag_of(second: u64) -> u64 {
    // Only the low 32 bits of the second are kept: 136 years before a tag repeats.
    (second & COUNT_MASK) << 32
}

/// True when the slot's tag is a later second than `tag` (comparing the 32-bit seconds with
/// wrap-around).
fn is_newer(slot_tag: u64, tag: u64) -> bool {
    let slot_second = (slot_tag >> 32) as u32;
    let second = (tag >> 32) as u32;
    slot_second != second && slot_second.wrapping_sub(second) < u32::MAX / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_complete_seconds_of_the_window() {
        let counts = RecentCounts::default();
        for second in 0..30 {
            for _ in 0..second {
                counts.add(second);
            }
        }
        // Seconds 20..=29 hold 20 + 21 + ... + 29 events; second 30 has not ended.
        assert_eq!(counts.sum(30), (245, Duration::from_secs(10)));
        // A second still being counted is left out.
        counts.add(30);
        assert_eq!(counts.sum(30).0, 245);
        assert_eq!(counts.sum(31).0, 245 - 20 + 1);
    }

    #[test]
    fn the_window_is_shorter_right_after_the_start() {
        let counts = RecentCounts::default();
        assert_eq!(counts.sum(0), (0, Duration::ZERO));
        counts.add(0);
        counts.add(0);
        counts.add(1);
        assert_eq!(counts.sum(2), (3, Duration::from_secs(2)));
    }

    #[test]
    fn quiet_seconds_count_nothing_even_when_their_slot_is_stale() {
        let counts = RecentCounts::default();
        counts.add(5);
        // Second 5 + SLOTS shares the slot of second 5 but is not second 5.
        let later = 5 + SLOTS as u64;
        assert_eq!(counts.sum(later + 1).0, 0);
        counts.add(later);
        assert_eq!(counts.sum(later + 1).0, 1);
        // A late event for second 5 does not overwrite the newer second.
        counts.add(5);
        assert_eq!(counts.sum(later + 1).0, 1);
    }

    #[test]
    fn concurrent_adds_are_all_counted() {
        let counts = std::sync::Arc::new(RecentCounts::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counts = counts.clone();
                std::thread::spawn(move || {
                    for second in 0..3 {
                        for _ in 0..1000 {
                            counts.add(second);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("counting thread");
        }
        assert_eq!(counts.sum(3), (12_000, Duration::from_secs(3)));
    }
}
