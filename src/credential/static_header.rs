//! The `header` kind: a static key (Edge delivery's `sc_apikey`, Content Hub's `X-GQL-Token`) set
//! as a header on every request of its routes. Nothing to fetch, nothing to refresh, always up.

use http::{HeaderName, HeaderValue};

use super::Injection;
use crate::config::HeaderSettings;

/// A static header credential; the value is marked sensitive.
#[derive(Debug)]
pub struct StaticHeader {
    name: HeaderName,
    value: HeaderValue,
}

impl StaticHeader {
    /// The header of credential `credential`; fails when the value is not a valid header value.
    pub(super) fn new(credential: &str, settings: &HeaderSettings) -> Result<StaticHeader, String> {
        let mut value = HeaderValue::from_str(settings.value.expose())
            .map_err(|_| format!("credential {credential}: value is not a valid header value"))?;
        value.set_sensitive(true);
        Ok(StaticHeader {
            name: settings.header.clone(),
            value,
        })
    }

    pub(super) fn injection(&self) -> Injection {
        Injection {
            name: self.name.clone(),
            value: self.value.clone(),
            token: None,
        }
    }

    pub(super) fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "type": "header", "header": self.name.as_str() })
    }

    pub(super) fn check(&self) -> String {
        format!("static header {}", self.name)
    }
}
