//! The emulator's public vocabulary: the APIs and their host families, the fault kinds, and the
//! records of what the token endpoint and the emulated APIs received.

use std::time::Duration;

/// One of the emulated Sitecore APIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// Authoring and Management GraphQL.
    Authoring,
    /// Deploy REST.
    Deploy,
    /// Edge Admin REST.
    EdgeAdmin,
    /// Edge Token REST (shares the Edge host with [`Api::EdgeAdmin`]).
    EdgeToken,
    /// Stream brands.
    StreamBrands,
    /// Stream documents (multipart uploads).
    StreamDocuments,
    /// Stream skills.
    StreamSkills,
}

impl Api {
    /// Every emulated API, in declaration order.
    pub fn all() -> &'static [Api] {
        &[
            Api::Authoring,
            Api::Deploy,
            Api::EdgeAdmin,
            Api::EdgeToken,
            Api::StreamBrands,
            Api::StreamDocuments,
            Api::StreamSkills,
        ]
    }

    /// The short name used in echo bodies and by the `demo` command.
    pub fn name(self) -> &'static str {
        match self {
            Api::Authoring => "authoring",
            Api::Deploy => "deploy",
            Api::EdgeAdmin => "edge-admin",
            Api::EdgeToken => "edge-token",
            Api::StreamBrands => "stream-brands",
            Api::StreamDocuments => "stream-documents",
            Api::StreamSkills => "stream-skills",
        }
    }

    /// The path of the API's base URL on its host ("" for APIs rooted at the host).
    pub(super) fn base_path(self) -> &'static str {
        match self {
            Api::Authoring => "/sitecore/api/authoring/graphql/v1",
            Api::EdgeAdmin => "/api/admin/v1",
            Api::EdgeToken => "/api/apikey/v1",
            Api::Deploy | Api::StreamBrands | Api::StreamDocuments | Api::StreamSkills => "",
        }
    }

    pub(super) fn family(self) -> Family {
        match self {
            Api::Authoring => Family::Authoring,
            Api::Deploy => Family::Deploy,
            Api::EdgeAdmin | Api::EdgeToken => Family::Edge,
            Api::StreamBrands => Family::Brands,
            Api::StreamDocuments => Family::Documents,
            Api::StreamSkills => Family::Skills,
        }
    }
}

/// A host family: one listener each. Edge Admin and Edge Token share the Edge host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Family {
    Authoring,
    Deploy,
    Edge,
    Brands,
    Documents,
    Skills,
}

impl Family {
    pub(super) const ALL: [Family; 6] = [
        Family::Authoring,
        Family::Deploy,
        Family::Edge,
        Family::Brands,
        Family::Documents,
        Family::Skills,
    ];

    pub(super) fn index(self) -> usize {
        match self {
            Family::Authoring => 0,
            Family::Deploy => 1,
            Family::Edge => 2,
            Family::Brands => 3,
            Family::Documents => 4,
            Family::Skills => 5,
        }
    }

    /// Which API a request path on this host belongs to. On the Edge host, anything outside
    /// `/api/apikey/v1` counts as Edge Admin.
    pub(super) fn api_for(self, path: &str) -> Api {
        match self {
            Family::Authoring => Api::Authoring,
            Family::Deploy => Api::Deploy,
            Family::Edge => {
                let token_base = Api::EdgeToken.base_path();
                let is_token = path
                    .strip_prefix(token_base)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
                if is_token {
                    Api::EdgeToken
                } else {
                    Api::EdgeAdmin
                }
            }
            Family::Brands => Api::StreamBrands,
            Family::Documents => Api::StreamDocuments,
            Family::Skills => Api::StreamSkills,
        }
    }
}

/// A fault the token endpoint applies to a request instead of its normal answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenFault {
    /// Answer this status with an Auth0-style `server_error` body.
    Status(u16),
    /// 401 `{"error":"access_denied","error_description":"Unauthorized"}`, whatever the credentials.
    AccessDenied,
    /// 429 with `Retry-After` and `x-ratelimit-reset` (a UNIX time).
    RateLimited {
        /// Seconds until the client may retry.
        retry_after_secs: u64,
    },
    /// Sleep, then answer normally.
    Delay(Duration),
    /// 200 with a body that is not JSON.
    MalformedBody,
    /// 200 with a token whose `aud` is `https://wrong.example`.
    WrongAudience,
    /// 200 with a token whose `iss` is `https://evil.example/`.
    WrongIssuer,
    /// 200 with a token that expired an hour ago.
    Expired,
    /// 200 with a token signed by a key the JWKS never publishes.
    UnknownKid,
    /// 200 with an unsigned token (`alg: none`).
    AlgNone,
    /// 200 with an HS256 token carrying the active RSA key's `kid`.
    Hs256,
    /// 200 with a good token but no `expires_in` field.
    NoExpiresIn,
}

/// A fault the emulated APIs apply to a request, whatever its path, after recording it and before
/// checking its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamFault {
    /// Answer this status with a small JSON body (401 also sets `WWW-Authenticate`).
    Status(u16),
    /// Answer this status with the same small JSON body as [`UpstreamFault::Status`] and these
    /// response headers, in order (lowercase or not; a repeated name is sent repeated), e.g. a 429
    /// with `Retry-After` or a 503 with `x-ratelimit-reset`. Nothing is implied: a 401 gets no
    /// `WWW-Authenticate` unless listed. A pair that is not a valid header is left out.
    StatusWithHeaders {
        /// The status (outside 200..=599: 500, as for [`UpstreamFault::Status`]).
        status: u16,
        /// Header names and values to send.
        headers: Vec<(String, String)>,
    },
    /// Sleep before the response headers, then answer normally.
    Delay(Duration),
    /// Drop the connection (HTTP/1.1) or reset the stream (HTTP/2) without a response.
    Reset,
    /// Read the request, answer 200 with a head declaring `declared` body bytes, send the first
    /// `sent` of them (the byte pattern of `emulator_bytes`), then nothing more: the body stalls
    /// until the peer gives up.
    StallBody {
        /// Body bytes sent before the stall.
        sent: u64,
        /// The `Content-Length` the head declares.
        declared: u64,
    },
}

/// A request as one of the emulated APIs received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// Which API (host family and, on the Edge host, path) received it.
    pub api: Api,
    /// The request method.
    pub method: String,
    /// The path, byte for byte as received (not decoded).
    pub path: String,
    /// The query, byte for byte as received, without the `?`.
    pub query: Option<String>,
    /// The `Authorization` header verbatim (repeated headers joined with ", ").
    pub authorization: Option<String>,
    /// Every other header, in order, lowercase names, one entry per value. For HTTP/2 requests
    /// without a `host` header, `host` is filled from the `:authority`.
    pub headers: Vec<(String, String)>,
    /// The request body size; 0 until the body has been read (it is read before the response is
    /// sent, except for [`UpstreamFault::Reset`]).
    pub body_bytes: u64,
    /// The SHA-256 of the body, lowercase hex (of the empty string until the body has been read).
    pub body_sha256: String,
    /// Whether the body broke off before its end (the peer reset or closed the connection, or
    /// sent a malformed body): `body_bytes` is then what arrived before.
    pub body_aborted: bool,
    /// Whether the bearer token passed the emulator's checks.
    pub token_valid: bool,
    /// The HTTP version, as `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
}

/// A request to the token endpoint. The client secret is never stored.
#[derive(Clone, Debug)]
pub struct TokenRequestRecord {
    /// The `Content-Type` header ("" when absent).
    pub content_type: String,
    /// The `client_id` field, when the body could be parsed.
    pub client_id: Option<String>,
    /// The `audience` field as sent (no default applied).
    pub audience: Option<String>,
    /// The `grant_type` field.
    pub grant_type: Option<String>,
    /// Whether the client authenticated with HTTP Basic (`client_secret_basic`).
    pub basic_auth: bool,
    /// Whether the body carried a `client_secret` field.
    pub secret_in_body: bool,
    /// The status the endpoint answered.
    pub outcome_status: u16,
}
