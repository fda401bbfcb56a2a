//! The refresher's fleet path (`[cluster]` with `share_tokens`): before fetching, a replica reads
//! the shared entry; one replica at a time holds the refresh lease and fetches, the others pick
//! up what it publishes. Every token read from Redis is verified like a fetched one.
//!
//! ```text
//!  attempt ─► read entry ──usable──────────────────────────────────► adopt (no token request)
//!                │ none / due / rejected / refused
//!                ├─ forced? ─► fleet budget ─spent─► wait for the winner's token ─► adopt
//!                │                  └─won─► fetch ─► publish (only over the rejected token)
//!                └─► lease ─won─► read again (published meanwhile? adopt) ─► fetch ─► publish
//!                       └─held─► poll entry until published or the lease ends ─► adopt / lease
//!  Redis fails at any step ─► fetch on its own (the store logs it; nothing waits past timeout)
//! ```

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use serde::{Deserialize, Serialize};

use super::verify::VerifyError;
use super::{OAuthCredential, Token};
use crate::cluster::seal::Fingerprint;
use crate::cluster::tokens::Entry;
use crate::cluster::SharedTokens;
use crate::metrics::VerificationLabels;

/// How often a replica waiting for another's fetch looks at the entry.
const POLL: Duration = Duration::from_millis(25);

/// The sealed plaintext: the token and the schedule its fetcher computed, so every replica
/// refreshes at the same moment and only one of them (the lease holder) fetches.
#[derive(Serialize, Deserialize)]
struct SharedEntry {
    access_token: String,
    obtained_at_ms: u64,
    serve_until_ms: u64,
    refresh_due_ms: u64,
    #[serde(default)]
    scope: Option<String>,
}

/// What the fleet said before a fetch.
pub(super) enum FromFleet {
    /// A verified token another replica fetched: nothing to fetch.
    Adopted(Token),
    /// Fetch one; then share it as `Publish` says.
    Fetch(Publish),
}

/// How to share a token this replica fetched.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Publish {
    /// The entry it replaces (`None`: there was none, or it is unknown).
    replaces: Option<Fingerprint>,
    /// This replica holds the lease and frees it after publishing.
    leased: bool,
}

/// What the entry is worth to this replica.
enum Read {
    Usable(Token),
    /// Replace it (due, rejected, refused or absent: `None`).
    Replace(Option<Fingerprint>),
}

/// Redis did not answer; the store has logged it.
struct Unavailable;

impl OAuthCredential {
    /// Before a fetch: a token from the fleet, or the go-ahead to fetch (see the module doc).
    pub(super) async fn ask_fleet(&self, shared: &SharedTokens, forced: bool) -> FromFleet {
        let rejected = if forced { self.rejected() } else { None };
        let seen = match self.read_shared(shared, rejected, false).await {
            Ok(Read::Usable(token)) => return FromFleet::Adopted(token),
            Ok(Read::Replace(seen)) => seen,
            Err(Unavailable) => return FromFleet::Fetch(Publish::default()),
        };
        if forced {
            return match shared.try_forced(self.tuning.forced_refresh_interval).await {
                Ok(true) => FromFleet::Fetch(Publish {
                    replaces: seen,
                    leased: false,
                }),
                Ok(false) => self.await_forced(shared, rejected).await,
                Err(_) => FromFleet::Fetch(Publish::default()),
            };
        }
        self.lease_or_wait(shared, seen).await
    }

    /// After a fetch: shares the token and frees the lease. Failures are logged by the store;
    /// the token is served either way.
    pub(super) async fn publish(&self, shared: &SharedTokens, token: &Token, how: Publish) {
        let now = SystemTime::now();
        let wall = super::wall_clock(now, Instant::now());
        let Some(jwt) = bearer(&token.authorization) else {
            return;
        };
        let serve_until = wall(token.serve_until);
        let entry = SharedEntry {
            access_token: jwt.to_owned(),
            obtained_at_ms: unix_ms(token.obtained_at),
            serve_until_ms: unix_ms(serve_until),
            refresh_due_ms: unix_ms(wall(token.refresh_due)),
            scope: token.scope.clone(),
        };
        let ttl = serve_until.duration_since(now).unwrap_or_default();
        if let Ok(plain) = serde_json::to_vec(&entry) {
            let fingerprint = shared.fingerprint(jwt);
            match shared
                .publish(&fingerprint, &plain, ttl, how.replaces.as_ref())
                .await
            {
                Ok(true) => {
                    tracing::debug!(credential = %self.name, "token shared with the fleet")
                }
                Ok(false) => tracing::debug!(
                    credential = %self.name,
                    "another replica shared a token meanwhile; kept the fleet's"
                ),
                Err(_) => {}
            }
        }
        if how.leased {
            let _ = shared.release_lease().await;
        }
    }

    /// Frees the lease after a failed fetch, so another replica may try at once.
    pub(super) async fn abandon(&self, shared: &SharedTokens, how: Publish) {
        if how.leased {
            let _ = shared.release_lease().await;
        }
    }

    /// Takes the lease and fetches, or waits for the holder's token.
    async fn lease_or_wait(
        &self,
        shared: &SharedTokens,
        mut seen: Option<Fingerprint>,
    ) -> FromFleet {
        let lease = self.lease_ttl();
        let deadline = Instant::now() + lease;
        loop {
            match shared.try_lease(lease).await {
                Ok(true) => {
                    // A holder may have published and released between our read and the lease.
                    return match self.read_shared(shared, None, false).await {
                        Ok(Read::Usable(token)) => {
                            let _ = shared.release_lease().await;
                            FromFleet::Adopted(token)
                        }
                        Ok(Read::Replace(now_seen)) => FromFleet::Fetch(Publish {
                            replaces: now_seen,
                            leased: true,
                        }),
                        Err(Unavailable) => FromFleet::Fetch(Publish {
                            replaces: seen,
                            leased: true,
                        }),
                    };
                }
                Ok(false) => {}
                Err(_) => return FromFleet::Fetch(Publish::default()),
            }
            if Instant::now() >= deadline {
                // The holder neither published nor let go: fetch without it.
                return FromFleet::Fetch(Publish {
                    replaces: seen,
                    leased: false,
                });
            }
            tokio::time::sleep(POLL).await;
            match self.read_shared(shared, None, false).await {
                Ok(Read::Usable(token)) => return FromFleet::Adopted(token),
                Ok(Read::Replace(now_seen)) => seen = now_seen,
                Err(Unavailable) => return FromFleet::Fetch(Publish::default()),
            }
        }
    }

    /// Another replica spent the fleet's forced refresh: wait for the token it publishes. If none
    /// comes within a lease, serve the entry as it is (the 401s go back to the clients, as when
    /// a single proxy's budget is spent) rather than refresh again.
    async fn await_forced(
        &self,
        shared: &SharedTokens,
        rejected: Option<Fingerprint>,
    ) -> FromFleet {
        let deadline = Instant::now() + self.lease_ttl();
        while Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            match self.read_shared(shared, rejected, false).await {
                Ok(Read::Usable(token)) => return FromFleet::Adopted(token),
                Ok(Read::Replace(_)) => {}
                Err(Unavailable) => return FromFleet::Fetch(Publish::default()),
            }
        }
        match self.read_shared(shared, None, true).await {
            Ok(Read::Usable(token)) => FromFleet::Adopted(token),
            _ => FromFleet::Fetch(Publish::default()),
        }
    }

    /// Reads and judges the entry. Usable: it opens, verifies, is not `rejected`, and is not
    /// due for refresh unless this replica has no token at all (or `any_valid`).
    async fn read_shared(
        &self,
        shared: &SharedTokens,
        rejected: Option<Fingerprint>,
        any_valid: bool,
    ) -> Result<Read, Unavailable> {
        let entry = match shared.read().await {
            Ok(Some(entry)) => entry,
            Ok(None) => return Ok(Read::Replace(None)),
            Err(_) => return Err(Unavailable),
        };
        let (fingerprint, plain) = match entry {
            Entry::Opened(fingerprint, plain) => (fingerprint, plain),
            Entry::Refused(why, fingerprint) => {
                tracing::warn!(
                    credential = %self.name,
                    reason = %why,
                    "refused the fleet's shared token entry; fetching a token of our own"
                );
                return Ok(Read::Replace(fingerprint));
            }
        };
        if rejected == Some(fingerprint) {
            return Ok(Read::Replace(Some(fingerprint)));
        }
        let Some(token) = self.verify_shared(&fingerprint, &plain, shared).await else {
            return Ok(Read::Replace(Some(fingerprint)));
        };
        let cold = self.current().is_none();
        if token.refresh_due > Instant::now() || cold || any_valid {
            Ok(Read::Usable(token))
        } else {
            Ok(Read::Replace(Some(fingerprint)))
        }
    }

    /// The token of an opened entry, verified exactly like a fetched one; `None` when it fails
    /// (counted in `token_verification_failures_total`) or is past serving.
    async fn verify_shared(
        &self,
        fingerprint: &Fingerprint,
        plain: &[u8],
        shared: &SharedTokens,
    ) -> Option<Token> {
        let entry: SharedEntry = serde_json::from_slice(plain).ok()?;
        if shared.fingerprint(&entry.access_token) != *fingerprint {
            return None;
        }
        let claims = match self.jwks.verify(&entry.access_token, &self.expect).await {
            Ok(claims) => claims,
            Err(e) => {
                self.count_verification_failure(&e);
                tracing::warn!(
                    credential = %self.name,
                    reason = e.reason(),
                    "the fleet's shared token failed verification; fetching a token of our own"
                );
                return None;
            }
        };
        let now_sys = SystemTime::now();
        let now = Instant::now();
        let expires_at = UNIX_EPOCH + Duration::from_secs(claims.exp);
        let serve_until =
            (UNIX_EPOCH + Duration::from_millis(entry.serve_until_ms)).min(expires_at);
        let serve_for = serve_until.duration_since(now_sys).ok()?;
        let due_in = (UNIX_EPOCH + Duration::from_millis(entry.refresh_due_ms))
            .duration_since(now_sys)
            .unwrap_or_default();
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {}", entry.access_token)).ok()?;
        authorization.set_sensitive(true);
        Some(Token {
            authorization,
            expires_at,
            serve_until: now + serve_for,
            refresh_due: now + due_in.min(serve_for),
            obtained_at: UNIX_EPOCH + Duration::from_millis(entry.obtained_at_ms),
            scope: claims.scope.or(entry.scope),
        })
    }

    pub(super) fn count_verification_failure(&self, error: &VerifyError) {
        self.metrics
            .token_verification_failures
            .get_or_create(&VerificationLabels {
                credential: std::sync::Arc::clone(&self.name),
                reason: error.reason(),
            })
            .inc();
    }

    /// How long one replica may hold the refresh lease: a token request and a JWKS fetch.
    fn lease_ttl(&self) -> Duration {
        self.tuning.token_request_timeout * 2
    }
}

/// The JWT of a `Bearer` value.
pub(super) fn bearer(authorization: &HeaderValue) -> Option<&str> {
    authorization.to_str().ok()?.strip_prefix("Bearer ")
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}
