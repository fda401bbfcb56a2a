//! One credential's shared state in Redis: the sealed token entry, the refresh lease (one replica
//! at a time fetches) and the forced-refresh budget (after an upstream 401, at most one refresh
//! per interval for the whole fleet). The token module decides when to use them; this file only
//! speaks to Redis, in sealed bytes.

use std::time::Duration;

use redis::Script;

use super::seal::{Fingerprint, OpenError, Sealer};
use super::{Cluster, StoreError};
use crate::secret::Secret;

/// Replaces the entry only while it is still exactly what the writer saw (ARGV[1], empty for
/// "there was none"): a replica never overwrites a newer token than the one it replaces, and
/// always replaces garbage it has seen, whatever its shape.
const PUBLISH: &str = r"
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Frees the lease only if this replica still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What the shared entry held.
pub enum Entry {
    /// Opened with this credential's key: the token's fingerprint and the plaintext (which holds
    /// the token: never printed).
    Opened(Fingerprint, Vec<u8>),
    /// Present but refused: another key, tampered, or not ours.
    Refused(OpenError),
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Opened(..) => f.write_str("Opened([redacted])"),
            Entry::Refused(e) => f.debug_tuple("Refused").field(e).finish(),
        }
    }
}

/// The entry as read: its raw bytes (what a replacement must find unchanged) and what they hold.
#[derive(Debug)]
pub struct Read {
    /// The stored value.
    pub raw: Vec<u8>,
    /// Opened or refused.
    pub entry: Entry,
}

/// The shared state of one credential.
#[derive(Debug)]
pub struct SharedTokens {
    cluster: Cluster,
    entry_key: String,
    lease_key: String,
    forced_key: String,
    sealer: Sealer,
    publish: Script,
    release: Script,
}

impl SharedTokens {
    pub(super) fn new(
        cluster: Cluster,
        entry_key: &str,
        lease_key: &str,
        forced_key: &str,
        secret: &Secret,
    ) -> SharedTokens {
        SharedTokens {
            sealer: Sealer::new(secret.expose().as_bytes(), entry_key),
            cluster,
            entry_key: entry_key.to_owned(),
            lease_key: lease_key.to_owned(),
            forced_key: forced_key.to_owned(),
            publish: Script::new(PUBLISH),
            release: Script::new(RELEASE),
        }
    }

    /// The fingerprint of `token` under this credential's key.
    pub fn fingerprint(&self, token: &str) -> Fingerprint {
        self.sealer.fingerprint(token)
    }

    /// Reads the entry; `None` when there is none.
    pub async fn read(&self) -> Result<Option<Read>, StoreError> {
        let raw: Option<Vec<u8>> = self
            .cluster
            .store()
            .query(redis::cmd("GET").arg(&self.entry_key))
            .await?;
        Ok(raw.map(|raw| {
            let entry = match self.sealer.open(&raw) {
                Ok((fingerprint, plain)) => Entry::Opened(fingerprint, plain),
                Err(e) => Entry::Refused(e),
            };
            Read { raw, entry }
        }))
    }

    /// Seals `plaintext` and stores it for `ttl`, unless the entry has changed since this
    /// replica read `replaces` (`None`: there was no entry). True when written.
    pub async fn publish(
        &self,
        fingerprint: &Fingerprint,
        plaintext: &[u8],
        ttl: Duration,
        replaces: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let Some(sealed) = self.sealer.seal(fingerprint, plaintext) else {
            return Ok(false);
        };
        let ttl_ms = ttl.as_millis().max(1).to_string();
        let written: i64 = self
            .cluster
            .store()
            .script(
                &self.publish,
                &[&self.entry_key],
                &[replaces.unwrap_or_default(), &sealed, ttl_ms.as_bytes()],
            )
            .await?;
        Ok(written == 1)
    }

    /// Takes the refresh lease for `ttl`; false when another replica holds it.
    pub async fn try_lease(&self, ttl: Duration) -> Result<bool, StoreError> {
        self.set_nx(&self.lease_key, ttl).await
    }

    /// Frees the lease if this replica holds it.
    pub async fn release_lease(&self) -> Result<(), StoreError> {
        let _: i64 = self
            .cluster
            .store()
            .script(
                &self.release,
                &[&self.lease_key],
                &[self.cluster.replica().as_bytes()],
            )
            .await?;
        Ok(())
    }

    /// Frees the lease in the background if this replica holds it: after an operation that
    /// timed out here may have taken it there, without making anyone wait for Redis again.
    pub fn release_lease_later(&self) {
        let cluster = self.cluster.clone();
        let key = self.lease_key.clone();
        let release = self.release.clone();
        tokio::spawn(async move {
            let _: Result<i64, _> = cluster
                .store()
                .script(&release, &[&key], &[cluster.replica().as_bytes()])
                .await;
        });
    }

    /// Spends the fleet's forced-refresh budget for `interval`; false when another replica
    /// already spent it.
    pub async fn try_forced(&self, interval: Duration) -> Result<bool, StoreError> {
        self.set_nx(&self.forced_key, interval).await
    }

    async fn set_nx(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let set: Option<String> = self
            .cluster
            .store()
            .query(
                redis::cmd("SET")
                    .arg(key)
                    .arg(self.cluster.replica())
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64),
            )
            .await?;
        Ok(set.is_some())
    }
}
