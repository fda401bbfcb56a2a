//! How a fleet divides one limit: in proportion to the demand each replica sees, so a client
//! whose keep-alive connection lands on one replica still gets the whole limit there.
//!
//! Every replica computes the same division from the same exchange, so the shares add up to 1
//! and the fleet admits the limit, not the limit times the replicas. An idle replica keeps a
//! tenth of an equal share, so its first requests pass while its demand reaches the others.

/// The part of an equal share an idle replica keeps.
const IDLE_FLOOR: f64 = 0.1;

/// The share of the replica with demand `own`, given every live replica's demand (`all`,
/// including `own`). Demands are requests per second offered to the limiter.
pub(super) fn share(own: f64, all: &[f64]) -> f64 {
    let replicas = all.len().max(1) as f64;
    let total: f64 = all.iter().copied().filter(|d| d.is_finite()).sum();
    if total.is_nan() || total <= 1e-9 {
        return 1.0 / replicas;
    }
    let floor = IDLE_FLOOR / replicas;
    let weight = |d: f64| (d / total).max(floor);
    let sum: f64 = all.iter().map(|d| weight(*d)).sum();
    (weight(own) / sum).clamp(0.0, 1.0)
}

/// The share while Redis is down: an equal part of what was last seen.
pub(super) fn fallback(replicas_last_seen: usize) -> f64 {
    1.0 / replicas_last_seen.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn equal_demand_splits_equally() {
        let all = [10.0, 10.0, 10.0];
        assert!(close(share(10.0, &all), 1.0 / 3.0));
    }

    #[test]
    fn alone_or_without_demand() {
        assert!(close(share(0.0, &[0.0]), 1.0));
        assert!(close(share(5.0, &[5.0]), 1.0));
        assert!(close(share(0.0, &[0.0, 0.0, 0.0, 0.0]), 0.25));
    }

    #[test]
    fn shares_follow_demand_and_add_up_to_one() {
        let all = [90.0, 10.0, 0.0];
        let shares: Vec<f64> = all.iter().map(|d| share(*d, &all)).collect();
        assert!(close(shares.iter().sum::<f64>(), 1.0));
        assert!(shares[0] > 0.8 && shares[0] < 0.9, "{shares:?}");
        assert!(shares[1] > 0.09 && shares[1] < 0.11, "{shares:?}");
        // The idle replica keeps a tenth of an equal share, normalised.
        assert!(shares[2] > 0.03 && shares[2] < 0.04, "{shares:?}");
    }

    #[test]
    fn garbage_demand_counts_as_none() {
        let all = [f64::NAN, 10.0];
        let s = share(10.0, &all);
        assert!(s > 0.9 && s <= 1.0, "{s}");
    }

    #[test]
    fn fallback_divides_by_the_replicas_last_seen() {
        assert!(close(fallback(3), 1.0 / 3.0));
        assert!(close(fallback(0), 1.0));
    }
}
