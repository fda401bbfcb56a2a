//! Sealing a shared token entry: AES-256-GCM under a key derived from the credential's client
//! secret, so Redis alone (or anyone who can write to it) never yields a usable token, and an
//! entry written for another credential or another key name does not open.
//!
//! An entry is `[version][fingerprint: 16][nonce: 12][ciphertext + tag]`. The fingerprint (an
//! HMAC of the token under a second derived key) names the token without revealing it: a replica
//! recognises the token an upstream refused without keeping the token. It is bound into the
//! AEAD's associated data with the version and the key name, so none of them can be changed or
//! moved onto another entry, and after opening it is checked against the token itself.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::{hkdf, hmac};

/// The entry format this code writes and reads.
const VERSION: u8 = 1;
/// Bytes of the token fingerprint.
pub const FINGERPRINT_LEN: usize = 16;
const HEADER_LEN: usize = 1 + FINGERPRINT_LEN + NONCE_LEN;

/// A short HMAC of a token: names it without revealing it.
pub type Fingerprint = [u8; FINGERPRINT_LEN];

/// Seals and opens one credential's shared entries. Holds key material: never printed.
pub struct Sealer {
    key: LessSafeKey,
    mac: hmac::Key,
    /// The Redis key the entries live under; entries moved to another key do not open.
    context: Vec<u8>,
}

/// Why an entry did not open. Says nothing about its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short or an unknown version: not written by this proxy.
    #[error("not an entry of this proxy")]
    Format,
    /// The tag did not verify: another key (another credential or secret) or tampering.
    #[error("does not open with this credential's key")]
    Key,
}

impl Sealer {
    /// Keys derived from `secret` (the client secret) for entries stored under `context`.
    pub fn new(secret: &[u8], context: &str) -> Sealer {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"sitecore-auth-proxy shared token v1");
        let prk = salt.extract(secret);
        // `expand` fails only for outputs longer than 255 hash lengths; these are 32 bytes.
        let aead = prk
            .expand(&[b"aead", context.as_bytes()], &AES_256_GCM)
            .map(UnboundKey::from);
        let mac = prk
            .expand(&[b"fingerprint", context.as_bytes()], hmac::HMAC_SHA256)
            .map(hmac::Key::from);
        let (Ok(aead), Ok(mac)) = (aead, mac) else {
            unreachable!("HKDF output of 32 bytes")
        };
        Sealer {
            key: LessSafeKey::new(aead),
            mac,
            context: context.as_bytes().to_vec(),
        }
    }

    /// The fingerprint of `token`.
    pub fn fingerprint(&self, token: &str) -> Fingerprint {
        let tag = hmac::sign(&self.mac, token.as_bytes());
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(&tag.as_ref()[..FINGERPRINT_LEN]);
        out
    }

    /// The sealed entry for `plaintext`, naming the token by `fingerprint`; `None` only if
    /// AES-GCM refuses the input (beyond 64 GiB).
    pub fn seal(&self, fingerprint: &Fingerprint, plaintext: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::Rng::fill(&mut rand::rng(), &mut nonce[..]);
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + AES_256_GCM.tag_len());
        out.push(VERSION);
        out.extend_from_slice(fingerprint);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(fingerprint)),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// The plaintext of `entry` and the fingerprint it names.
    pub fn open(&self, entry: &[u8]) -> Result<(Fingerprint, Vec<u8>), OpenError> {
        if entry.len() < HEADER_LEN + AES_256_GCM.tag_len() || entry[0] != VERSION {
            return Err(OpenError::Format);
        }
        let fingerprint = fingerprint_of(entry).ok_or(OpenError::Format)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&entry[1 + FINGERPRINT_LEN..HEADER_LEN]);
        let mut body = entry[HEADER_LEN..].to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(&fingerprint)),
                &mut body,
            )
            .map_err(|_| OpenError::Key)?
            .len();
        body.truncate(plain);
        Ok((fingerprint, body))
    }

    /// The version, the key name and the fingerprint: none can be changed or moved unnoticed.
    fn aad(&self, fingerprint: &Fingerprint) -> Vec<u8> {
        let mut aad = Vec::with_capacity(1 + self.context.len() + FINGERPRINT_LEN);
        aad.push(VERSION);
        aad.extend_from_slice(&self.context);
        aad.extend_from_slice(fingerprint);
        aad
    }
}

/// The fingerprint an entry names, read without opening it.
fn fingerprint_of(entry: &[u8]) -> Option<Fingerprint> {
    entry.get(1..1 + FINGERPRINT_LEN)?.try_into().ok()
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_opens_with_the_same_secret_and_context_only() {
        let sealer = Sealer::new(b"secret", "p:token:automation");
        let fp = sealer.fingerprint("eyJ.token");
        let entry = sealer
            .seal(&fp, b"{\"access_token\":\"eyJ.token\"}")
            .expect("sealed");
        assert_eq!(
            sealer.open(&entry),
            Ok((fp, b"{\"access_token\":\"eyJ.token\"}".to_vec()))
        );
        assert_eq!(fingerprint_of(&entry), Some(fp));
        // The plaintext is not in the entry.
        assert!(!entry.windows(9).any(|w| w == b"eyJ.token"));

        let other_secret = Sealer::new(b"other", "p:token:automation");
        assert_eq!(other_secret.open(&entry), Err(OpenError::Key));
        let other_key = Sealer::new(b"secret", "p:token:other");
        assert_eq!(other_key.open(&entry), Err(OpenError::Key));
    }

    #[test]
    fn tampering_is_refused() {
        let sealer = Sealer::new(b"secret", "ctx");
        let fp = sealer.fingerprint("t");
        let entry = sealer.seal(&fp, b"payload").expect("sealed");
        for i in 0..entry.len() {
            let mut bad = entry.clone();
            bad[i] ^= 0x01;
            assert!(sealer.open(&bad).is_err(), "byte {i} flipped still opened");
        }
        assert_eq!(sealer.open(&entry[..10]), Err(OpenError::Format));
        assert_eq!(sealer.open(b""), Err(OpenError::Format));
    }

    #[test]
    fn fingerprints_differ_by_token_and_key() {
        let a = Sealer::new(b"secret", "ctx");
        let b = Sealer::new(b"secret2", "ctx");
        assert_eq!(a.fingerprint("t1"), a.fingerprint("t1"));
        assert_ne!(a.fingerprint("t1"), a.fingerprint("t2"));
        assert_ne!(a.fingerprint("t1"), b.fingerprint("t1"));
        assert_eq!(format!("{a:?}"), "Sealer { .. }");
    }
}
