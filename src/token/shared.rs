//! The refresher's fleet path (`[cluster]` with `share_tokens`): before fetching, a replica reads
//! the shared entry; one replica at a time holds the refresh lease and fetches, the others pick
//! up what it publishes. Every token read from Redis is verified like a fetched one.
//!
//! ```text
//!  attempt ─► read entry ──usable───────────────────────────────────► adopt (no token request)
//!                │ none / due / rejected / refused
//!                ├─ forced? ─► fleet budget ─won──► fetch ─► publish (only over what it read)
//!                │                  └─spent─► serve the fleet's token, even the refused one,
//!                │                            and adopt the winner's when it is shared
//!                └─► lease ─won─► read again (published meanwhile? adopt) ─► fetch ─► publish
//!                       └─held─► poll until published (adopt) or the lease is free (take it)
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

/// How often a replica waiting for another's fetch looks at the entry (quietly: a refused entry
/// is logged and counted once per attempt, not once per look).
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
    /// Nothing to fetch and nothing new: keep serving what the replica has (another replica
    /// spent the fleet's forced refresh and has not shared its token yet).
    Kept,
    /// Fetch one; then share it as `Publish` says.
    Fetch(Publish),
}

/// How to share a token this replica fetched.
#[derive(Debug, Default)]
pub(super) struct Publish {
    /// The raw entry it replaces, which must still be there unchanged (`None`: there was none).
    replaces: Option<Vec<u8>>,
    /// This replica holds the lease and frees it after publishing.
    leased: bool,
}

/// What the entry is worth to this replica.
enum Read {
    /// A verified token to serve, and its fingerprint.
    Usable(Token, Fingerprint),
    /// Replace it (due, rejected or refused: its raw bytes; absent: `None`).
    Replace(Option<Vec<u8>>),
}

/// Which entries a replica takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// One not yet due for refresh (any valid one while this replica has no token).
    Fresh,
    /// Any valid one, due or not.
    AnyValid,
}

/// Redis did not answer; the store has logged it.
struct Unavailable;

impl OAuthCredential {
    /// Before a fetch: a token from the fleet, or the go-ahead to fetch (see the module doc).
    pub(super) async fn ask_fleet(&self, shared: &SharedTokens, forced: bool) -> FromFleet {
        let rejected = if forced { self.rejected() } else { None };
        let seen = match self.read_shared(shared, rejected, Want::Fresh, true).await {
            Ok(Read::Usable(token, _)) => return FromFleet::Adopted(token),
            Ok(Read::Replace(seen)) => seen,
            Err(Unavailable) => return FromFleet::Fetch(Publish::default()),
        };
        if forced {
            return match shared.try_forced(self.tuning.forced_refresh_interval).await {
                Ok(true) => FromFleet::Fetch(Publish {
                    replaces: seen,
                    leased: false,
                }),
                Ok(false) => self.after_spent_budget(shared, rejected).await,
                Err(_) => {
                    // It may have been spent there all the same; a spent budget only delays the
                    // others' forced refresh, it never stops a fetch.
                    FromFleet::Fetch(Publish {
                        replaces: seen,
                        leased: false,
                    })
                }
            };
        }
        self.lease_or_wait(shared, seen).await
    }

    /// After a fetch: shares the token and frees the lease. Failures are logged by the store;
    /// the token is served either way (it was installed before this runs).
    pub(super) async fn publish(&self, shared: &SharedTokens, token: &Token, how: Publish) {
        let now = SystemTime::now();
        let wall = super::wall_clock(now, Instant::now());
        if let Some(jwt) = bearer(&token.authorization) {
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
                    .publish(&fingerprint, &plain, ttl, how.replaces.as_deref())
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
        }
        self.abandon(shared, how).await;
    }

    /// Frees the lease after a failed fetch, so another replica may try at once.
    pub(super) async fn abandon(&self, shared: &SharedTokens, how: Publish) {
        if how.leased && shared.release_lease().await.is_err() {
            shared.release_lease_later();
        }
    }

    /// Takes the lease and fetches, or waits for the holder's token. A holder that dies leaves
    /// the lease to expire, and then exactly one waiter takes it over (`SET NX`).
    async fn lease_or_wait(&self, shared: &SharedTokens, mut seen: Option<Vec<u8>>) -> FromFleet {
        let lease = self.lease_ttl();
        // Each holder's lease ends within `lease`; waiting through several of them means Redis
        // keeps leases it should not (a key without expiry, say).
        let give_up = Instant::now() + lease * 3;
        loop {
            match shared.try_lease(lease).await {
                Ok(true) => {
                    // A holder may have published and released between our read and the lease.
                    return match self.read_shared(shared, None, Want::Fresh, false).await {
                        Ok(Read::Usable(token, _)) => {
                            self.abandon(
                                shared,
                                Publish {
                                    replaces: None,
                                    leased: true,
                                },
                            )
                            .await;
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
                Err(_) => {
                    // The lease may have been set there after our deadline passed here.
                    shared.release_lease_later();
                    return FromFleet::Fetch(Publish {
                        replaces: seen,
                        leased: false,
                    });
                }
            }
            if Instant::now() >= give_up {
                return FromFleet::Fetch(Publish {
                    replaces: seen,
                    leased: false,
                });
            }
            tokio::time::sleep(POLL).await;
            match self.read_shared(shared, None, Want::Fresh, false).await {
                Ok(Read::Usable(token, _)) => return FromFleet::Adopted(token),
                Ok(Read::Replace(now_seen)) => seen = now_seen,
                Err(Unavailable) => {
                    return FromFleet::Fetch(Publish {
                        replaces: seen,
                        leased: false,
                    })
                }
            }
        }
    }

    /// Another replica spent the fleet's forced refresh. Serve what the fleet holds meanwhile,
    /// even the token this replica saw refused (a single proxy whose budget is spent keeps its
    /// token and lets the 401 through), and take the winner's token when it is shared. With
    /// nothing valid to serve, one replica fetches for the fleet under the lease.
    async fn after_spent_budget(
        &self,
        shared: &SharedTokens,
        rejected: Option<Fingerprint>,
    ) -> FromFleet {
        match self.read_shared(shared, None, Want::AnyValid, false).await {
            Ok(Read::Usable(token, fingerprint)) if Some(fingerprint) != rejected => {
                return FromFleet::Adopted(token)
            }
            Ok(Read::Usable(token, _)) => self.adopt(
                token,
                "serving the refused token until the replica refreshing it shares a new one",
            ),
            Ok(Read::Replace(seen)) => return self.lease_or_wait(shared, seen).await,
            Err(Unavailable) => return FromFleet::Fetch(Publish::default()),
        }
        let deadline = Instant::now() + self.lease_ttl();
        while Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            match self.read_shared(shared, rejected, Want::Fresh, false).await {
                Ok(Read::Usable(token, _)) => return FromFleet::Adopted(token),
                Ok(Read::Replace(_)) => {}
                Err(Unavailable) => break,
            }
        }
        FromFleet::Kept
    }

    /// Reads and judges the entry: usable when it opens, verifies, is not `rejected` and is what
    /// `want` asks for. `loud`: say why an entry is refused (once per attempt, not per poll).
    async fn read_shared(
        &self,
        shared: &SharedTokens,
        rejected: Option<Fingerprint>,
        want: Want,
        loud: bool,
    ) -> Result<Read, Unavailable> {
        let read = match shared.read().await {
            Ok(Some(read)) => read,
            Ok(None) => return Ok(Read::Replace(None)),
            Err(_) => return Err(Unavailable),
        };
        let (fingerprint, plain) = match &read.entry {
            Entry::Opened(fingerprint, plain) => (*fingerprint, plain),
            Entry::Refused(why) => {
                if loud {
                    tracing::warn!(
                        credential = %self.name,
                        reason = %why,
                        "refused the fleet's shared token entry; fetching a token of our own"
                    );
                }
                return Ok(Read::Replace(Some(read.raw)));
            }
        };
        if rejected == Some(fingerprint) {
            return Ok(Read::Replace(Some(read.raw)));
        }
        let Some(token) = self.verify_shared(&fingerprint, plain, shared, loud).await else {
            return Ok(Read::Replace(Some(read.raw)));
        };
        let cold = self.current().is_none();
        if token.refresh_due > Instant::now() || cold || want == Want::AnyValid {
            Ok(Read::Usable(token, fingerprint))
        } else {
            Ok(Read::Replace(Some(read.raw)))
        }
    }

    /// The token of an opened entry, verified exactly like a fetched one; `None` when it fails
    /// (counted in `token_verification_failures_total`) or is past serving.
    async fn verify_shared(
        &self,
        fingerprint: &Fingerprint,
        plain: &[u8],
        shared: &SharedTokens,
        loud: bool,
    ) -> Option<Token> {
        let entry: SharedEntry = serde_json::from_slice(plain).ok()?;
        if shared.fingerprint(&entry.access_token) != *fingerprint {
            return None;
        }
        let claims = match self.jwks.verify(&entry.access_token, &self.expect).await {
            Ok(claims) => claims,
            Err(e) if !loud => {
                tracing::debug!(credential = %self.name, reason = e.reason(), "shared token still fails verification");
                return None;
            }
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
