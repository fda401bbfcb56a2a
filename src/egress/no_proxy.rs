//! `NO_PROXY` with curl's rules: a comma- (or space-) separated list where `*` alone bypasses the
//! proxy for every host; a host name matches itself and its subdomains (a leading `.` is
//! allowed and means the same); an IP address matches that address, and `addr/len` a CIDR range;
//! an entry with `:port` matches only that port. Matching is case-insensitive; there is no
//! automatic bypass for loopback (name `localhost` or `127.0.0.1` in `NO_PROXY` for that).

use std::net::IpAddr;

/// The parsed `NO_PROXY` list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NoProxy {
    all: bool,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    target: Target,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Lower case, without a leading dot.
    Domain(String),
    Network {
        addr: IpAddr,
        prefix: u8,
    },
}

impl NoProxy {
    /// Parses a `NO_PROXY` value; entries that cannot mean anything (empty) are skipped.
    pub fn parse(list: &str) -> NoProxy {
        let mut no_proxy = NoProxy::default();
        for item in list.split([',', ' ', '\t']).map(str::trim) {
            if item.is_empty() {
                continue;
            }
            if item == "*" {
                no_proxy.all = true;
                continue;
            }
            no_proxy.entries.push(Entry::parse(item));
        }
        no_proxy
    }

    /// Whether `host:port` is reached directly.
    pub fn bypasses(&self, host: &str, port: u16) -> bool {
        if self.all {
            return true;
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ip = host.parse::<IpAddr>().ok();
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        self.entries.iter().any(|e| {
            e.port.is_none_or(|p| p == port)
                && match (&e.target, ip) {
                    (Target::Network { addr, prefix }, Some(ip)) => in_network(ip, *addr, *prefix),
                    (Target::Domain(domain), None) => {
                        name == *domain
                            || name
                                .strip_suffix(domain.as_str())
                                .is_some_and(|rest| rest.ends_with('.'))
                    }
                    // A name entry never matches an address, nor an address entry a name: curl
                    // does not resolve either.
                    (Target::Domain(domain), Some(ip)) => domain.parse::<IpAddr>() == Ok(ip),
                    (Target::Network { .. }, None) => false,
                }
        })
    }

    /// Whether the list is empty (nothing bypasses the proxy).
    pub fn is_empty(&self) -> bool {
        !self.all && self.entries.is_empty()
    }
}

impl Entry {
    fn parse(item: &str) -> Entry {
        // `[v6]:port`, `[v6]`, `v4/len`, `v6/len`, `host:port`, `v6` (several colons, no port).
        let (host, port) = if let Some(rest) = item.strip_prefix('[') {
            match rest.split_once(']') {
                Some((host, tail)) => (host, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
                None => (rest, None),
            }
        } else if item.matches(':').count() == 1 {
            match item.split_once(':') {
                Some((host, port)) => match port.parse() {
                    Ok(port) => (host, Some(port)),
                    Err(_) => (item, None),
                },
                None => (item, None),
            }
        } else {
            (item, None)
        };
        let target = match host.split_once('/') {
            Some((addr, len)) => match (addr.parse::<IpAddr>(), len.parse::<u8>()) {
                (Ok(addr), Ok(prefix)) if prefix <= max_prefix(addr) => {
                    Target::Network { addr, prefix }
                }
                _ => Target::Domain(host.to_ascii_lowercase()),
            },
            None => match host.parse::<IpAddr>() {
                Ok(addr) => Target::Network {
                    addr,
                    prefix: max_prefix(addr),
                },
                Err(_) => Target::Domain(
                    host.trim_start_matches('.')
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                ),
            },
        };
        Entry { target, port }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn in_network(ip: IpAddr, network: IpAddr, prefix: u8) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}
