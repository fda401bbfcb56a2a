//! Files named by the configuration: PEM certificates and keys, and secret files. Each reader
//! returns a one-line message naming the file and what was expected.

use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A secret file larger than this is almost certainly the wrong file.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Every certificate in a PEM file; at least one.
pub(super) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| pem_error(path, e))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(format!(
            "{shown} holds no certificate; expected PEM blocks starting with \
             \"-----BEGIN CERTIFICATE-----\""
        ));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(super) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "{} holds no private key; expected a PEM block such as \
             \"-----BEGIN PRIVATE KEY-----\"",
            path.display()
        ),
        other => pem_error(path, other),
    })
}

fn pem_error(path: &Path, error: pem::Error) -> String {
    match error {
        pem::Error::Io(e) => format!("cannot read {}: {e}", path.display()),
        other => format!("{} is not valid PEM: {other}", path.display()),
    }
}

/// A secret file's content, without one trailing `\n` or `\r\n`; never empty.
pub(super) fn read_secret_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !metadata.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if metadata.len() > MAX_SECRET_FILE {
        return Err(format!(
            "{shown} is larger than 64 KiB; a secret file holds only the secret"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut text = String::from_utf8(bytes).map_err(|_| format!("{shown} is not UTF-8 text"))?;
    if text.ends_with("\r\n") {
        text.truncate(text.len() - 2);
    } else if text.ends_with('\n') {
        text.truncate(text.len() - 1);
    }
    if text.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    Ok(text)
}
