//! A route's handles on its series: recording a request through them skips the families'
//! lookups, and [`RouteMetrics::record`] is the one place a finished request is counted, timed
//! and kept in the histories.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use super::history::{self, Histories, History};
use super::{duration_histogram, RequestLabels};

/// A route's handles on its series (see [`super::Metrics::register_route`]).
#[derive(Debug)]
pub struct RouteMetrics {
    /// Its series of `proxy_request_duration_seconds`.
    pub duration: Histogram,
    /// Its series of `proxy_requests_total`.
    pub requests: RouteRequests,
    /// Its last 15 minutes, for the status page.
    pub history: Arc<History>,
}

impl RouteMetrics {
    /// Handles on series that no registry exports: for routes built alone (tests, benchmarks).
    pub fn unregistered(route: &Arc<str>) -> RouteMetrics {
        RouteMetrics {
            duration: duration_histogram(),
            requests: RouteRequests::new(
                Family::default(),
                Arc::clone(route),
                Arc::new(Histories::new(false)),
            ),
            history: Arc::new(History::with_latency()),
        }
    }

    /// Records one finished request of this route, once, from its access record:
    /// `proxy_requests_total{route, client, status}`, `proxy_request_duration_seconds{route}`,
    /// and the route's and client's histories.
    pub fn record(&self, client: &Arc<str>, status: u16, seconds: f64) {
        // When tracing lands, the request's trace id can ride along here as an exemplar.
        let bucket = history::current_bucket();
        self.requests.count_in(bucket, client, status);
        self.duration.observe(seconds);
        self.history.record_in(bucket, status, seconds);
    }
}

/// The series of `proxy_requests_total` a route has counted, by client and status, and the
/// histories of those clients. Counting looks the pair up in a snapshot of the series seen so
/// far, without a lock. A miss takes the lock of the series added since the snapshot
/// (`recent`), finds or adds the series there, and now and then folds them into a new snapshot
/// (see [`Recent::misses`]).
#[derive(Debug)]
pub struct RouteRequests {
    family: Family<RequestLabels, Counter>,
    route: Arc<str>,
    clients: Arc<Histories>,
    seen: ArcSwap<Series>,
    recent: Mutex<Recent>,
}

/// Series by [`SeriesKey`]: a hash lookup, so a gateway with a thousand clients pays what one
/// with ten does.
type Series = HashMap<SeriesKey, SeenSeries, foldhash::fast::RandomState>;

/// A series' client, by the address of its name, and its status. Clients' names are the
/// configuration's `Arc`s, the same for every request of a client; the entry holds its `Arc`,
/// so the address is not reused while the entry exists. The same name in another allocation
/// is another key for the same series (the family and the histories find it by name).
type SeriesKey = (usize, u16);

fn key(client: &Arc<str>, status: u16) -> SeriesKey {
    (Arc::as_ptr(client).cast::<u8>() as usize, status)
}

/// One series of a [`RouteRequests`].
#[derive(Debug, Clone)]
struct SeenSeries {
    /// Keeps the key's address in use.
    _client: Arc<str>,
    counter: Counter,
    usage: Arc<History>,
}

impl SeenSeries {
    fn record_in(&self, bucket: u64, status: u16) {
        self.counter.inc();
        self.usage.record_in(bucket, status, 0.0);
    }
}

/// The series a [`RouteRequests`] added since its snapshot.
#[derive(Debug, Default)]
struct Recent {
    series: Series,
    /// Requests that missed the snapshot since it was made. A new snapshot copies the old one,
    /// so it is made once the misses reach the old one's size: each miss pays for copying one
    /// series, whether the misses are new series (the snapshot doubles) or the same few
    /// (they move into it after that many requests). Adding each new series to a new
    /// snapshot instead makes a route's warm-up quadratic: a route that 1,000 clients use
    /// would copy up to 1,000 series 1,000 times.
    misses: usize,
}

impl RouteRequests {
    pub(super) fn new(
        family: Family<RequestLabels, Counter>,
        route: Arc<str>,
        clients: Arc<Histories>,
    ) -> RouteRequests {
        RouteRequests {
            family,
            route,
            clients,
            seen: ArcSwap::from_pointee(Series::default()),
            recent: Mutex::default(),
        }
    }

    /// Drops the series found so far; their counts stay in the family. For a `RouteRequests`
    /// that outlives a reload (the unrouted requests'): the reloaded clients' names are new
    /// allocations, so the old keys would never be found again, only kept.
    pub fn forget_clients(&self) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.series = Series::default();
        recent.misses = 0;
        self.seen.store(Arc::default());
    }

    /// `proxy_requests_total{route, client, status}` + 1, and the request in the client's
    /// history.
    pub fn count(&self, client: &Arc<str>, status: u16) {
        self.count_in(history::current_bucket(), client, status);
    }

    /// [`RouteRequests::count`], in the history's bucket `bucket`.
    fn count_in(&self, bucket: u64, client: &Arc<str>, status: u16) {
        let key = key(client, status);
        let seen = self.seen.load();
        if let Some(series) = seen.get(&key) {
            series.record_in(bucket, status);
            return;
        }
        drop(seen);
        self.recent_series(key, client, status)
            .record_in(bucket, status);
    }

    /// The series `key`, from the recent ones, added to them if new; folds them into a new
    /// snapshot when the misses have paid for its copy.
    fn recent_series(&self, key: SeriesKey, client: &Arc<str>, status: u16) -> SeenSeries {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = self.seen.load();
        // Another request may have made a snapshot with it since this one looked.
        if let Some(series) = seen.get(&key) {
            return series.clone();
        }
        recent.misses += 1;
        let series = match recent.series.get(&key) {
            Some(series) => series.clone(),
            None => {
                let series = SeenSeries {
                    _client: Arc::clone(client),
                    counter: self
                        .family
                        .get_or_create(&RequestLabels {
                            route: Arc::clone(&self.route),
                            client: Arc::clone(client),
                            status,
                        })
                        .clone(),
                    usage: self.clients.get_or_create(client),
                };
                recent.series.insert(key, series.clone());
                series
            }
        };
        if recent.misses >= seen.len() {
            let mut next = Series::clone(&seen);
            next.extend(recent.series.drain());
            self.seen.store(Arc::new(next));
            recent.misses = 0;
        }
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn count_of(metrics: &Metrics, client: &str, status: u16) -> Option<u64> {
        let line = format!(
            "proxy_requests_total{{route=\"/deploy\",client=\"{client}\",status=\"{status}\"}} "
        );
        let text = metrics.encode();
        let at = text.find(&line)? + line.len();
        text[at..].split_whitespace().next()?.parse().ok()
    }

    #[test]
    fn a_route_counts_its_requests_by_client_and_status_in_the_family() {
        let metrics = Metrics::new();
        let route = metrics.register_route(&Arc::from("/deploy"));
        let (a, b) = (Arc::<str>::from("team-a"), Arc::<str>::from("team-b"));
        // An equal name in another allocation is the same series.
        let a_again = Arc::<str>::from("team-a");
        for _ in 0..3 {
            route.requests.count(&a, 200);
        }
        route.requests.count(&a_again, 200);
        route.requests.count(&a, 503);
        route.requests.count(&b, 200);
        assert_eq!(count_of(&metrics, "team-a", 200), Some(4));
        assert_eq!(count_of(&metrics, "team-a", 503), Some(1));
        assert_eq!(count_of(&metrics, "team-b", 200), Some(1));
    }

    #[test]
    fn a_recorded_request_is_counted_timed_and_kept_in_both_histories() {
        let metrics = Metrics::new();
        let label: Arc<str> = Arc::from("/deploy");
        let route = metrics.register_route(&label);
        let client = Arc::<str>::from("team-a");
        route.record(&client, 200, 0.004);
        route.record(&client, 429, 0.000_05);
        metrics.unrouted_requests.count(&client, 404);
        assert_eq!(count_of(&metrics, "team-a", 200), Some(1));
        assert!(metrics
            .encode()
            .contains("proxy_request_duration_seconds_count{route=\"/deploy\"} 2"));

        let next = history::current_bucket() + 1;
        let routed = route.history.snapshot_before(next);
        assert_eq!(routed.requests.iter().sum::<u32>(), 2);
        assert_eq!(routed.refused.iter().sum::<u32>(), 1);
        let usage = metrics
            .client_histories
            .get("team-a")
            .expect("client history")
            .snapshot_before(next);
        assert_eq!(
            usage.requests.iter().sum::<u32>(),
            3,
            "unrouted requests too"
        );
        assert_eq!(usage.errors.iter().sum::<u32>(), 1);
        assert_eq!(usage.p50_ms, None, "clients keep no latency");

        // A reload registers the route again: same history.
        let again = metrics.register_route(&label);
        assert!(Arc::ptr_eq(&route.history, &again.history));
    }

    #[test]
    fn a_thousand_clients_are_added_with_few_snapshot_copies_then_found_without_a_lock() {
        let metrics = Metrics::new();
        let route = metrics.register_route(&Arc::from("/deploy"));
        let requests = &route.requests;
        let clients: Vec<Arc<str>> = (0..1000).map(|i| Arc::from(format!("c{i}"))).collect();
        let mut copies = 0;
        for _round in 0..2 {
            for client in &clients {
                let before = requests.seen.load_full();
                requests.count(client, 200);
                copies += usize::from(!Arc::ptr_eq(&before, &requests.seen.load_full()));
            }
        }
        // The snapshot doubles (1, 2, 4, ... 512), then takes the rest in once their misses
        // have paid for it: 11 copies, not one per client.
        assert_eq!(copies, 11);
        assert_eq!(requests.seen.load().len(), 1000);
        let recent = requests.recent.lock().expect("recent series");
        assert!(recent.series.is_empty());
        assert_eq!(recent.misses, 0);
        drop(recent);

        let full = requests.seen.load_full();
        for client in &clients {
            requests.count(client, 200);
        }
        assert!(Arc::ptr_eq(&full, &requests.seen.load_full()));
        for name in ["c0", "c511", "c999"] {
            assert_eq!(count_of(&metrics, name, 200), Some(3), "{name}");
        }
    }

    #[test]
    fn a_series_missing_from_a_large_snapshot_is_counted_from_the_recent_ones() {
        let metrics = Metrics::new();
        let route = metrics.register_route(&Arc::from("/deploy"));
        let client = Arc::<str>::from("-");
        for status in 100..108 {
            route.requests.count(&client, status);
        }
        let snapshot = route.requests.seen.load_full();
        assert_eq!(snapshot.len(), 8);
        // One new series: its misses pay for a copy of 8 series after 8 requests, so the
        // first 7 are counted from the recent series, under the lock, without a copy.
        for _ in 0..7 {
            route.requests.count(&client, 599);
        }
        assert!(Arc::ptr_eq(&snapshot, &route.requests.seen.load_full()));
        route.requests.count(&client, 599);
        assert_eq!(route.requests.seen.load().len(), 9);
        assert_eq!(count_of(&metrics, "-", 599), Some(8));
        assert_eq!(count_of(&metrics, "-", 100), Some(1));
    }

    #[test]
    fn forgetting_the_clients_keeps_their_counts() {
        let metrics = Metrics::new();
        let before = Arc::<str>::from("team-a");
        metrics.unrouted_requests.count(&before, 404);
        metrics.unrouted_requests.forget_clients();
        assert!(metrics.unrouted_requests.seen.load().is_empty());
        // After a reload the same client has a new name allocation.
        let after = Arc::<str>::from("team-a");
        metrics.unrouted_requests.count(&after, 404);
        assert_eq!(metrics.unrouted_requests.seen.load().len(), 1);
        assert!(metrics
            .encode()
            .contains("proxy_requests_total{route=\"-\",client=\"team-a\",status=\"404\"} 2"));
    }

    #[test]
    fn concurrent_first_sightings_are_all_counted_once_each() {
        let metrics = Metrics::new();
        let route = metrics.register_route(&Arc::from("/deploy"));
        let clients: Vec<Arc<str>> = (0..300).map(|i| Arc::from(format!("c{i}"))).collect();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..5 {
                        for client in &clients {
                            route.requests.count(client, 200);
                        }
                    }
                });
            }
        });
        for client in &clients {
            assert_eq!(count_of(&metrics, client, 200), Some(20), "{client}");
        }
        let known = route.requests.seen.load().len();
        let recent = route
            .requests
            .recent
            .lock()
            .expect("recent series")
            .series
            .len();
        assert_eq!(known + recent, 300);
    }
}
