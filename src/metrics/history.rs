//! A bounded history of requests for the status page's charts: the last 15 minutes in 5-second
//! buckets, each with the requests, the errors among them and (for routes) a small latency
//! histogram good enough for p50 and p99.
//!
//! A history is a ring of [`BUCKETS`] slots allocated once and reused, so its memory is fixed
//! whatever the traffic (see [`History::memory`]: about 34 KiB with latency, 3.5 KiB without).
//! Recording takes no lock. Each slot carries the number of the bucket it counts (its epoch);
//! the first request of a new bucket claims the slot with one compare-and-swap, zeroes it and
//! publishes the new epoch, and every other request adds to its counters with relaxed atomic
//! increments. Readers check a slot's epoch before and after reading it (a seqlock) and take
//! only complete buckets, so a chart never shows a half-counted bucket as a dip.
//!
//! What counts as an error: a status of 500 or above (the upstream's, or the proxy's own
//! `token_unavailable`, `overloaded`, `upstream_unreachable`, `upstream_timeout`) and 429 (the
//! proxy's refusals `rate_limited` and `too_many_in_flight`, `upstream_throttled` replaying an
//! upstream's 429, and an upstream's own 429): each is a request the client was not served.
//! The 429s are also counted apart as `refused`, a subset of `errors`, so the page can tell
//! refusals from failures. A client that went away (499) and the other 4xx are the client's own
//! doing and are not errors.

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Instant;

use serde::Serialize;

/// Seconds per bucket.
pub const BUCKET_SECONDS: u64 = 5;

/// Buckets kept: 15 minutes.
pub const BUCKETS: usize = 180;

/// Latency bins: one under 64 µs, two per octave (`[2^k, 1.5·2^k)` and `[1.5·2^k, 2^(k+1))`)
/// from 64 µs to 2^27 µs (134 s), and one above.
pub const LATENCY_BINS: usize = 44;

/// The first octave with bins of its own: 2^6 µs = 64 µs.
const FIRST_OCTAVE: u32 = 6;

// The counters of a slot, in order; the latency bins follow.
const REQUESTS: usize = 0;
const ERRORS: usize = 1;
const REFUSED: usize = 2;
const COUNTS: usize = 3;

/// The epoch of a slot being zeroed for a new bucket.
const RESETTING: u64 = u64::MAX;

/// Bucket 0 starts here: every history of the process shares the same bucket boundaries.
static CLOCK: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The number of the bucket `at` falls in.
pub fn bucket_of(at: Instant) -> u64 {
    at.saturating_duration_since(*CLOCK).as_secs() / BUCKET_SECONDS
}

/// The number of the bucket being counted now.
pub fn current_bucket() -> u64 {
    bucket_of(Instant::now())
}

/// Requests per bucket over the last [`BUCKETS`] buckets.
#[derive(Debug)]
pub struct History {
    /// Per slot: its bucket's number + 1 (0: never used), or [`RESETTING`].
    epochs: Box<[AtomicU64]>,
    /// Per slot, `stride` counters: [`COUNTS`] counts, then the latency bins if any.
    counts: Box<[AtomicU32]>,
    stride: usize,
}

/// What a history holds, oldest bucket first, complete buckets only. Serialised as the `history`
/// of a route or client on `/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// Seconds per bucket.
    pub bucket_seconds: u64,
    /// Requests that ended in each bucket.
    pub requests: Vec<u32>,
    /// Those answered with a status of 500 or above, or 429.
    pub errors: Vec<u32>,
    /// Those answered with 429 (a subset of `errors`).
    pub refused: Vec<u32>,
    /// Estimated median latency per bucket, in milliseconds (`None` for a bucket without
    /// requests); absent for histories without latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<Vec<Option<f64>>>,
    /// Estimated 99th percentile latency per bucket, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<Vec<Option<f64>>>,
}

impl History {
    /// A history of requests, errors and latencies (a route's).
    pub fn with_latency() -> History {
        History::new(COUNTS + LATENCY_BINS)
    }

    /// A history of requests and errors only (a client's).
    pub fn counts_only() -> History {
        History::new(COUNTS)
    }

    fn new(stride: usize) -> History {
        LazyLock::force(&CLOCK);
        History {
            epochs: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            counts: (0..BUCKETS * stride).map(|_| AtomicU32::new(0)).collect(),
            stride,
        }
    }

    fn has_latency(&self) -> bool {
        self.stride > COUNTS
    }

    /// Records one request that ended now with `status` after `seconds`.
    pub fn record(&self, status: u16, seconds: f64) {
        self.record_in(current_bucket(), status, seconds);
    }

    /// Records one request in bucket `bucket`. A request whose bucket's slot already counts a
    /// later bucket (its recorder was held up for the whole ring) is dropped.
    pub fn record_in(&self, bucket: u64, status: u16, seconds: f64) {
        let slot = slot_of(bucket);
        if !self.claim(slot, bucket + 1) {
            return;
        }
        let counts = &self.counts[slot * self.stride..(slot + 1) * self.stride];
        counts[REQUESTS].fetch_add(1, Ordering::Relaxed);
        if status >= 500 || status == 429 {
            counts[ERRORS].fetch_add(1, Ordering::Relaxed);
        }
        if status == 429 {
            counts[REFUSED].fetch_add(1, Ordering::Relaxed);
        }
        if self.has_latency() {
            counts[COUNTS + latency_bin(seconds)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Makes `slot` count bucket `epoch - 1`, zeroing it if it counted an earlier one; false
    /// when it counts a later bucket.
    ///
    /// Another thread may be zeroing the slot for the same bucket: that takes a few dozen
    /// stores, so this waits for it, spinning and then yielding (on a busy machine the zeroing
    /// thread may have been preempted). Only if it never finishes is the request dropped.
    fn claim(&self, slot: usize, epoch: u64) -> bool {
        const SPINS: u32 = 64;
        const YIELDS_END: u32 = SPINS + 64;
        let current = &self.epochs[slot];
        let mut seen = current.load(Ordering::Acquire);
        let mut waited = 0;
        loop {
            if seen == epoch {
                return true;
            }
            if seen == RESETTING {
                waited += 1;
                match waited {
                    0..SPINS => std::hint::spin_loop(),
                    SPINS..=YIELDS_END => std::thread::yield_now(),
                    _ => return false,
                }
                seen = current.load(Ordering::Acquire);
                continue;
            }
            if seen > epoch {
                return false;
            }
            match current.compare_exchange(seen, RESETTING, Ordering::Acquire, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => seen = actual,
            }
        }
        // The zeroing must not be seen before RESETTING is (readers check the epoch after
        // reading the counters).
        fence(Ordering::Release);
        for count in &self.counts[slot * self.stride..(slot + 1) * self.stride] {
            count.store(0, Ordering::Relaxed);
        }
        current.store(epoch, Ordering::Release);
        true
    }

    /// The complete buckets of the last 15 minutes.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_before(current_bucket())
    }

    /// The [`BUCKETS`] buckets before bucket `end` (which is still being counted), oldest
    /// first. Buckets before the first one, never counted, or counted while being read, are
    /// empty.
    pub fn snapshot_before(&self, end: u64) -> Snapshot {
        let mut snapshot = Snapshot {
            bucket_seconds: BUCKET_SECONDS,
            requests: Vec::with_capacity(BUCKETS),
            errors: Vec::with_capacity(BUCKETS),
            refused: Vec::with_capacity(BUCKETS),
            p50_ms: self.has_latency().then(|| Vec::with_capacity(BUCKETS)),
            p99_ms: self.has_latency().then(|| Vec::with_capacity(BUCKETS)),
        };
        let mut slot_counts = vec![0; self.stride];
        for age in (1..=BUCKETS as u64).rev() {
            let counted = end
                .checked_sub(age)
                .is_some_and(|bucket| self.read(bucket, &mut slot_counts));
            if !counted {
                slot_counts.fill(0);
            }
            snapshot.requests.push(slot_counts[REQUESTS]);
            snapshot.errors.push(slot_counts[ERRORS]);
            snapshot.refused.push(slot_counts[REFUSED]);
            let bins = &slot_counts[COUNTS..];
            if let Some(p50) = &mut snapshot.p50_ms {
                p50.push(quantile_ms(bins, 0.50));
            }
            if let Some(p99) = &mut snapshot.p99_ms {
                p99.push(quantile_ms(bins, 0.99));
            }
        }
        snapshot
    }

    /// Copies the counters of `bucket` into `out`; false when its slot counts another bucket
    /// (before or after the copy).
    fn read(&self, bucket: u64, out: &mut [u32]) -> bool {
        let slot = slot_of(bucket);
        let epoch = &self.epochs[slot];
        if epoch.load(Ordering::Acquire) != bucket + 1 {
            return false;
        }
        let counts = &self.counts[slot * self.stride..(slot + 1) * self.stride];
        for (out, count) in out.iter_mut().zip(counts) {
            *out = count.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        epoch.load(Ordering::Relaxed) == bucket + 1
    }

    /// Bytes this history holds, fixed at creation.
    pub fn memory(&self) -> usize {
        std::mem::size_of::<History>()
            + self.epochs.len() * std::mem::size_of::<AtomicU64>()
            + self.counts.len() * std::mem::size_of::<AtomicU32>()
    }
}

fn slot_of(bucket: u64) -> usize {
    // The remainder is below BUCKETS, so the cast cannot truncate.
    (bucket % BUCKETS as u64) as usize
}

/// The latency bin of a duration in seconds.
fn latency_bin(seconds: f64) -> usize {
    // `as` saturates (and maps NaN and negatives to 0).
    let micros = (seconds * 1e6) as u64;
    if micros < 1 << FIRST_OCTAVE {
        return 0;
    }
    let octave = 63 - micros.leading_zeros();
    let upper_half = (micros >> (octave - 1)) & 1;
    let bin = 1 + 2 * (octave - FIRST_OCTAVE) as usize + upper_half as usize;
    bin.min(LATENCY_BINS - 1)
}

/// The bounds of a latency bin in microseconds (the last bin's upper bound is its lower one).
fn bin_bounds(bin: usize) -> (f64, f64) {
    if bin == 0 {
        return (0.0, f64::from(1u32 << FIRST_OCTAVE));
    }
    let octave = FIRST_OCTAVE as usize + (bin - 1) / 2;
    let base = (1u64 << octave) as f64;
    if bin == LATENCY_BINS - 1 {
        return (base, base);
    }
    let half = ((bin - 1) % 2) as f64;
    (base * (2.0 + half) / 2.0, base * (3.0 + half) / 2.0)
}

/// The `q` quantile of the latencies counted in `bins`, in milliseconds rounded to the
/// microsecond: the bin holding it, interpolated linearly by rank inside the bin.
fn quantile_ms(bins: &[u32], q: f64) -> Option<f64> {
    let total: u64 = bins.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0);
    let mut below = 0.0;
    for (bin, &count) in bins.iter().enumerate() {
        let count = f64::from(count);
        if count > 0.0 && below + count >= rank {
            let (low, high) = bin_bounds(bin);
            // The samples of a bin are taken as spread evenly over it, each in the middle of
            // its share.
            let within = (rank - below - 0.5) / count;
            let micros = low + within * (high - low);
            return Some((micros).round() / 1000.0);
        }
        below += count;
    }
    None
}

/// Histories by name (route prefix or client name), kept for the life of the process so that a
/// reload keeps the charts of the routes and clients it keeps. A name is looked up here only the
/// first time a route's metrics meet it; requests record through the `Arc` kept then.
#[derive(Debug)]
pub struct Histories {
    latency: bool,
    by_name: Mutex<HashMap<Arc<str>, Arc<History>>>,
}

impl Histories {
    /// Histories with latency ([`History::with_latency`]) or without.
    pub fn new(latency: bool) -> Histories {
        Histories {
            latency,
            by_name: Mutex::new(HashMap::new()),
        }
    }

    /// The history of `name`, created empty on first use.
    pub fn get_or_create(&self, name: &Arc<str>) -> Arc<History> {
        let mut by_name = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        let history = by_name.entry(Arc::clone(name)).or_insert_with(|| {
            Arc::new(if self.latency {
                History::with_latency()
            } else {
                History::counts_only()
            })
        });
        Arc::clone(history)
    }

    /// The history of `name`, if anything was recorded for it.
    pub fn get(&self, name: &str) -> Option<Arc<History>> {
        let by_name = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        by_name.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last<T: Copy>(values: &[T]) -> T {
        values[values.len() - 1]
    }

    #[test]
    fn requests_land_in_their_bucket_oldest_first_complete_buckets_only() {
        let history = History::with_latency();
        for _ in 0..3 {
            history.record_in(500, 200, 0.002);
        }
        history.record_in(501, 503, 0.002);
        history.record_in(501, 429, 0.0001);
        history.record_in(501, 404, 0.002);
        history.record_in(501, 499, 0.002);
        // Bucket 502 is still being counted: not shown.
        history.record_in(502, 200, 0.002);

        let snapshot = history.snapshot_before(502);
        assert_eq!(snapshot.bucket_seconds, BUCKET_SECONDS);
        for series in [&snapshot.requests, &snapshot.errors, &snapshot.refused] {
            assert_eq!(series.len(), BUCKETS);
        }
        assert_eq!(snapshot.requests[BUCKETS - 2..], [3, 4]);
        assert_eq!(snapshot.errors[BUCKETS - 2..], [0, 2]);
        assert_eq!(snapshot.refused[BUCKETS - 2..], [0, 1]);
        assert_eq!(snapshot.requests.iter().sum::<u32>(), 7);
        let p50 = snapshot.p50_ms.expect("latency");
        assert_eq!(
            p50[BUCKETS - 3],
            None,
            "a bucket without requests has no p50"
        );
        assert!(p50[BUCKETS - 2].is_some());

        // One bucket later, the bucket that was being counted shows, and the oldest is gone.
        let later = history.snapshot_before(503);
        assert_eq!(later.requests[BUCKETS - 3..], [3, 4, 1]);
    }

    #[test]
    fn a_slot_is_reset_when_the_ring_wraps_around() {
        let history = History::counts_only();
        history.record_in(7, 200, 0.0);
        history.record_in(7, 500, 0.0);
        let wrapped = 7 + BUCKETS as u64;
        // Its slot still holds bucket 7, which is outside the window now: empty, not 2.
        let snapshot = history.snapshot_before(wrapped + 1);
        assert_eq!(last(&snapshot.requests), 0);
        assert_eq!(snapshot.requests.iter().sum::<u32>(), 0);

        history.record_in(wrapped, 200, 0.0);
        let snapshot = history.snapshot_before(wrapped + 1);
        assert_eq!(last(&snapshot.requests), 1, "the old counts were zeroed");
        assert_eq!(last(&snapshot.errors), 0);
        // A request held up for a whole ring does not count into the newer bucket.
        history.record_in(7, 200, 0.0);
        assert_eq!(last(&history.snapshot_before(wrapped + 1).requests), 1);
        assert_eq!(history.snapshot_before(wrapped + 1).p50_ms, None);
    }

    #[test]
    fn the_window_right_after_the_start_is_padded_with_empty_buckets() {
        let history = History::counts_only();
        history.record_in(0, 200, 0.0);
        history.record_in(1, 200, 0.0);
        let snapshot = history.snapshot_before(2);
        assert_eq!(snapshot.requests.len(), BUCKETS);
        assert_eq!(snapshot.requests[BUCKETS - 2..], [1, 1]);
        assert_eq!(history.snapshot_before(0).requests, vec![0; BUCKETS]);
    }

    /// The exact `q` quantile (nearest rank) of sorted samples.
    fn exact(sorted: &[f64], q: f64) -> f64 {
        let rank = (q * sorted.len() as f64).ceil() as usize;
        sorted[rank.max(1) - 1]
    }

    #[test]
    fn percentiles_are_estimated_within_the_resolution_of_the_bins() {
        // Log-uniform from 0.1 ms to 10 s, and a tight cluster with a slow tail.
        let spread: Vec<f64> = (0..2000)
            .map(|i| 1e-4 * 10f64.powf(5.0 * f64::from(i) / 1999.0))
            .collect();
        let mut tail: Vec<f64> = (0..1000).map(|i| 0.010 + f64::from(i % 7) * 1e-4).collect();
        tail.extend((0..15).map(|i| 0.8 + f64::from(i) * 0.01));
        tail.sort_by(f64::total_cmp);
        for samples in [spread, tail] {
            let history = History::with_latency();
            for &s in &samples {
                history.record_in(10, 200, s);
            }
            let snapshot = history.snapshot_before(11);
            for (q, estimates) in [(0.5, &snapshot.p50_ms), (0.99, &snapshot.p99_ms)] {
                let estimate = last(estimates.as_ref().expect("latency")).expect("requests");
                let truth = exact(&samples, q) * 1000.0;
                let error = (estimate - truth).abs() / truth;
                // A bin spans a third to a half of its lower bound.
                assert!(
                    error < 0.25,
                    "q{q}: estimated {estimate} ms, exact {truth} ms"
                );
            }
        }
    }

    #[test]
    fn latencies_outside_the_bins_are_clamped() {
        assert_eq!(latency_bin(0.0), 0);
        assert_eq!(latency_bin(-1.0), 0);
        assert_eq!(latency_bin(f64::NAN), 0);
        assert_eq!(latency_bin(0.000_064), 1);
        assert_eq!(latency_bin(0.000_096), 2);
        assert_eq!(latency_bin(0.000_128), 3);
        assert_eq!(latency_bin(1e9), LATENCY_BINS - 1);
        let history = History::with_latency();
        history.record_in(0, 200, 3600.0);
        let p99 = history.snapshot_before(1).p99_ms.expect("latency");
        // The last bin reports its lower bound, 2^27 µs.
        assert_eq!(last(&p99), Some(134_217.728));
        // Every bin's bounds meet the next bin's.
        for bin in 0..LATENCY_BINS - 2 {
            assert_eq!(bin_bounds(bin).1, bin_bounds(bin + 1).0, "bin {bin}");
        }
    }

    #[test]
    fn memory_is_fixed_whatever_the_traffic() {
        let history = History::with_latency();
        let before = history.memory();
        assert_eq!(
            before,
            std::mem::size_of::<History>() + BUCKETS * (8 + 4 * (COUNTS + LATENCY_BINS))
        );
        assert!(before < 36 * 1024, "{before} bytes");
        for bucket in 0..10 * BUCKETS as u64 {
            for status in [200, 429, 503] {
                history.record_in(bucket, status, bucket as f64 * 1e-3);
            }
        }
        assert_eq!(history.memory(), before);
        let snapshot = history.snapshot_before(10 * BUCKETS as u64);
        assert_eq!(snapshot.requests, vec![3; BUCKETS]);
        assert_eq!(snapshot.errors, vec![2; BUCKETS]);
        assert!(History::counts_only().memory() < 4 * 1024);
    }

    #[test]
    fn concurrent_recordings_are_all_counted() {
        let history = Arc::new(History::with_latency());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let history = Arc::clone(&history);
                std::thread::spawn(move || {
                    for bucket in 0..3 {
                        for _ in 0..1000 {
                            history.record_in(bucket, 200, 0.001);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("recording thread");
        }
        let snapshot = history.snapshot_before(3);
        assert_eq!(snapshot.requests[BUCKETS - 3..], [4000, 4000, 4000]);
    }

    #[test]
    fn a_name_keeps_its_history() {
        let histories = Histories::new(false);
        let name: Arc<str> = Arc::from("team-a");
        let first = histories.get_or_create(&name);
        assert!(Arc::ptr_eq(
            &first,
            &histories.get_or_create(&Arc::from("team-a"))
        ));
        assert!(Arc::ptr_eq(&first, &histories.get("team-a").expect("kept")));
        assert!(histories.get("team-b").is_none());
    }
}
