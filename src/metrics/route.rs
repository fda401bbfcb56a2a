//! A route's handles on its series: recording a request through them skips the families'
//! lookups, and [`RouteMetrics::record`] is the one place a finished request is counted, timed
//! and kept in the histories.

use std::sync::Arc;

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
/// far, without a lock or a hash; a series seen for the first time comes from the family (and
/// its client's history from the histories) and goes into a new snapshot.
#[derive(Debug)]
pub struct RouteRequests {
    family: Family<RequestLabels, Counter>,
    route: Arc<str>,
    clients: Arc<Histories>,
    seen: ArcSwap<Vec<SeenSeries>>,
}

/// One series in a [`RouteRequests`] snapshot.
#[derive(Debug, Clone)]
struct SeenSeries {
    client: Arc<str>,
    status: u16,
    counter: Counter,
    usage: Arc<History>,
}

/// The snapshot's bound. It keeps the first series a route sees (a route's clients and
/// statuses are few, and a reload starts a new snapshot); series beyond it are counted through
/// the family's lookup, as before the snapshots.
const MAX_SEEN: usize = 64;

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
            seen: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// `proxy_requests_total{route, client, status}` + 1, and the request in the client's
    /// history.
    pub fn count(&self, client: &Arc<str>, status: u16) {
        self.count_in(history::current_bucket(), client, status);
    }

    /// [`RouteRequests::count`], in the history's bucket `bucket`.
    fn count_in(&self, bucket: u64, client: &Arc<str>, status: u16) {
        let same = |s: &SeenSeries| {
            s.status == status && (Arc::ptr_eq(&s.client, client) || s.client == *client)
        };
        let seen = self.seen.load();
        if let Some(series) = seen.iter().find(|s| same(s)) {
            series.counter.inc();
            series.usage.record_in(bucket, status, 0.0);
            return;
        }
        let full = seen.len() >= MAX_SEEN;
        drop(seen);
        let counter = self
            .family
            .get_or_create(&RequestLabels {
                route: Arc::clone(&self.route),
                client: Arc::clone(client),
                status,
            })
            .clone();
        counter.inc();
        let usage = self.clients.get_or_create(client);
        usage.record_in(bucket, status, 0.0);
        if full {
            // No new snapshot (`rcu` would copy and swap one even with nothing to add).
            return;
        }
        self.seen.rcu(|seen| {
            let mut seen = Vec::clone(seen);
            if seen.len() < MAX_SEEN && !seen.iter().any(same) {
                seen.push(SeenSeries {
                    client: Arc::clone(client),
                    status,
                    counter: counter.clone(),
                    usage: Arc::clone(&usage),
                });
            }
            seen
        });
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
        assert_eq!(route.requests.seen.load().len(), 3);
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
    fn series_beyond_the_snapshot_bound_are_still_counted() {
        let metrics = Metrics::new();
        let route = metrics.register_route(&Arc::from("/deploy"));
        let client = Arc::<str>::from("-");
        for status in 100..(100 + MAX_SEEN as u16 + 10) {
            route.requests.count(&client, status);
            route.requests.count(&client, status);
        }
        assert_eq!(route.requests.seen.load().len(), MAX_SEEN);
        // A full snapshot is not copied and swapped again for series beyond it.
        let full = route.requests.seen.load_full();
        route.requests.count(&client, 999);
        assert!(Arc::ptr_eq(&full, &route.requests.seen.load_full()));
        assert_eq!(count_of(&metrics, "-", 999), Some(1));
        for status in [100, 100 + MAX_SEEN as u16 + 9] {
            assert_eq!(count_of(&metrics, "-", status), Some(2), "status {status}");
        }
    }
}
