//! One credential's shared state in Redis: the sealed token entry, the refresh lease (one replica
//! at a time fetches) and the forced-refresh budget (after an upstream 401, at most one refresh
//! per interval for the whole fleet). The token module decides when to use them; this file only
//! speaks to Redis, in sealed bytes.

use std::time::Duration;

use redis::Script;

use super::seal::{fingerprint_of, Fingerprint, OpenError, Sealer};
use super::{Cluster, StoreError};
use crate::secret::Secret;

/// Replaces the entry only while it still names the token the writer saw (ARGV[1], empty for
/// "there was none"): a replica never overwrites a newer token than the one it replaces.
const PUBLISH: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  if ARGV[1] == '' or string.sub(current, 2, 17) ~= ARGV[1] then
    return 0
  end
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
#[derive(Debug)]
pub enum Entry {
    /// Opened with this credential's key: the token's fingerprint and the plaintext.
    Opened(Fingerprint, Vec<u8>),
    /// Present but refused (another key, tampered, or not ours); its fingerprint bytes, if any,
    /// so that a replica can replace exactly it.
    Refused(OpenError, Option<Fingerprint>),
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

    /// The longest one Redis operation waits.
    pub fn timeout(&self) -> Duration {
        self.cluster.store().timeout()
    }

    /// Reads the entry; `None` when there is none.
    pub async fn read(&self) -> Result<Option<Entry>, StoreError> {
        let raw: Option<Vec<u8>> = self
            .cluster
            .store()
            .query(redis::cmd("GET").arg(&self.entry_key))
            .await?;
        Ok(raw.map(|raw| match self.sealer.open(&raw) {
            Ok((fingerprint, plain)) => Entry::Opened(fingerprint, plain),
            Err(e) => Entry::Refused(e, fingerprint_of(&raw)),
        }))
    }

    /// Seals `plaintext` and stores it for `ttl`, unless the entry has changed since this
    /// replica saw `replaces` (`None`: there was no entry). True when written.
    pub async fn publish(
        &self,
        fingerprint: &Fingerprint,
        plaintext: &[u8],
        ttl: Duration,
        replaces: Option<&Fingerprint>,
    ) -> Result<bool, StoreError> {
        let sealed = self.sealer.seal(fingerprint, plaintext);
        let ttl_ms = ttl.as_millis().max(1).to_string();
        let written: i64 = self
            .cluster
            .store()
            .script(
                &self.publish,
                &[&self.entry_key],
                &[
                    replaces.map_or(&[][..], |f| &f[..]),
                    &sealed,
                    ttl_ms.as_bytes(),
                ],
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
