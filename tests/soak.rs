//! Soak: ten minutes (`SOAK_SECONDS`, default 600) of mixed load through the proxy against the
//! emulator, with the neighbours' everyday trouble mixed in, and the process watched for leaks.
//!
//! Run it with `benches/soak.sh [SECONDS]`, or
//! `SOAK_SECONDS=600 cargo test --release --test soak -- --ignored --nocapture`.
//!
//! Sixteen workers loop over: GraphQL POSTs to `/authoring`, REST GETs to `/deploy`, 1–4 MiB
//! uploads to `/stream`, full downloads checked byte for byte, and downloads the client drops
//! halfway (aborts). Tokens live 37 s, so with `refresh_at = 0.8` the background refresh runs
//! about every 30 s; every 15 s one upstream request is answered 401, which forces a refresh and
//! a replay, or, inside the one-per-30 s forced-refresh limit (or for an upload larger than the
//! replay buffer), goes back to the client. Those 401s are the expected errors; anything else is
//! unexpected. Every minute (`SOAK_SAMPLE_SECONDS`) the test prints and records requests, errors
//! by kind, token requests and the process's RSS; at the end it asserts zero unexpected errors,
//! a token request count within the lifecycle's budget and no RSS growth trend, and writes the
//! table to `benches/soak-report.md`.
//!
//! The process holds the load generator, the emulator and the proxy, so RSS covers all three;
//! the emulator keeps only its last 1,000 request records so that its logs cannot pass for a
//! leak.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use sitecore_auth_proxy::emulator::{pattern_bytes, Emulator, UpstreamFault};
use sitecore_auth_proxy::token::Tuning;
use support::{Harness, Setup};

const CONCURRENCY: usize = 16;
const TOKEN_LIFETIME: Duration = Duration::from_secs(37);
/// How often one upstream request is answered 401.
const UNAUTHORIZED_EVERY: Duration = Duration::from_secs(15);
const MIB: usize = 1024 * 1024;
/// Upload sizes, all larger than the 1 MiB replay buffer, none a round number.
const UPLOAD_SIZES: [usize; 4] = [MIB + 17, 2 * MIB + 3, 3 * MIB - 5, 4 * MIB];
/// A download checked byte for byte.
const DOWNLOAD_BYTES: usize = 256 * 1024 + 7;
/// A download the client drops after [`ABORT_AFTER`] bytes.
const ABORTED_DOWNLOAD_BYTES: usize = 32 * MIB;
const ABORT_AFTER: usize = 256 * 1024;
/// The RSS of the last sample may exceed the second sample's by at most this factor.
const RSS_GROWTH_LIMIT: f64 = 1.2;

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The process's resident set size in KiB (`VmRSS` of /proc/self/status).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    GraphQl,
    Rest,
    Upload,
    Download,
    Abort,
}

impl Op {
    fn pick(rng: &mut impl Rng) -> Op {
        match rng.random_range(0..100) {
            0..40 => Op::GraphQl,
            40..70 => Op::Rest,
            70..80 => Op::Upload,
            80..90 => Op::Download,
            _ => Op::Abort,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::GraphQl => "graphql POST /authoring",
            Op::Rest => "REST GET /deploy",
            Op::Upload => "upload POST /stream",
            Op::Download => "download GET /deploy",
            Op::Abort => "aborted download GET /deploy",
        }
    }
}

/// How one operation ended.
enum Outcome {
    Ok,
    /// The client dropped the download on purpose.
    Aborted,
    /// An upstream 401 that reached the client: expected while 401s were injected.
    Unauthorized(&'static str),
    Unexpected(String),
}

/// Running totals.
#[derive(Clone, Default)]
struct Tally {
    requests: u64,
    ok: u64,
    aborted: u64,
    unauthorized: BTreeMap<&'static str, u64>,
    unexpected: BTreeMap<String, u64>,
    by_op: BTreeMap<Op, u64>,
}

impl Tally {
    fn unauthorized_total(&self) -> u64 {
        self.unauthorized.values().sum()
    }

    fn unexpected_total(&self) -> u64 {
        self.unexpected.values().sum()
    }
}

/// What the workers share.
struct Load {
    http: reqwest::Client,
    base: String,
    upload_data: Bytes,
    upload_digests: Vec<String>,
    download_expected: Bytes,
    tally: Mutex<Tally>,
    /// The first unexpected errors in full, for the log.
    first_errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Load {
    fn record(&self, op: Op, outcome: Outcome) {
        let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        tally.requests += 1;
        *tally.by_op.entry(op).or_insert(0) += 1;
        match outcome {
            Outcome::Ok => tally.ok += 1,
            Outcome::Aborted => tally.aborted += 1,
            Outcome::Unauthorized(kind) => *tally.unauthorized.entry(kind).or_insert(0) += 1,
            Outcome::Unexpected(detail) => {
                let kind = format!("{}: {}", op.name(), detail_kind(&detail));
                *tally.unexpected.entry(kind).or_insert(0) += 1;
                drop(tally);
                let mut first = self
                    .first_errors
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if first.len() < 20 {
                    first.push(format!("{}: {detail}", op.name()));
                }
            }
        }
    }

    fn snapshot(&self) -> Tally {
        self.tally
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn run(&self, op: Op, rng: &mut impl Rng) -> Outcome {
        match op {
            Op::GraphQl => self.graphql(rng).await,
            Op::Rest => self.rest(rng).await,
            Op::Upload => self.upload(rng).await,
            Op::Download => self.download().await,
            Op::Abort => self.abort(rng).await,
        }
    }

    async fn graphql(&self, rng: &mut impl Rng) -> Outcome {
        let body = format!(
            r#"{{"query":"query Item($n: Int) {{ item(path: \"/sitecore/content/home\") {{ id name }} }}","variables":{{"n":{}}}}}"#,
            rng.random_range(0..1_000_000u32)
        );
        let digest = hex::encode(Sha256::digest(body.as_bytes()));
        let sent = self
            .http
            .post(self.url("/authoring"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let echo = match echo(sent, "401 replay refused (forced-refresh limit)").await {
            Ok(echo) => echo,
            Err(outcome) => return outcome,
        };
        check_echo(&echo, "authoring", "POST", &digest)
    }

    async fn rest(&self, rng: &mut impl Rng) -> Outcome {
        let page = rng.random_range(0..100u32);
        let sent = self
            .http
            .get(self.url(&format!("/deploy/api/projects/v1?page={page}")))
            .send()
            .await;
        let echo = match echo(sent, "401 replay refused (forced-refresh limit)").await {
            Ok(echo) => echo,
            Err(outcome) => return outcome,
        };
        if echo["query"] != format!("page={page}") {
            return Outcome::Unexpected(format!("echo mismatch: query {}", echo["query"]));
        }
        check_echo(&echo, "deploy", "GET", &hex::encode(Sha256::digest([])))
    }

    async fn upload(&self, rng: &mut impl Rng) -> Outcome {
        let which = rng.random_range(0..UPLOAD_SIZES.len());
        let size = UPLOAD_SIZES[which];
        let sent = self
            .http
            .post(self.url("/stream/api/documents/v1/upload"))
            .header("content-type", "application/octet-stream")
            .body(self.upload_data.slice(..size))
            .send()
            .await;
        let echo = match echo(sent, "401 on an upload larger than the replay buffer").await {
            Ok(echo) => echo,
            Err(outcome) => return outcome,
        };
        if echo["body_bytes"] != size as u64 {
            return Outcome::Unexpected(format!(
                "echo mismatch: body_bytes {} of {size}",
                echo["body_bytes"]
            ));
        }
        check_echo(
            &echo,
            "stream-documents",
            "POST",
            &self.upload_digests[which],
        )
    }

    async fn download(&self) -> Outcome {
        let sent = self
            .http
            .get(self.url(&format!(
                "/deploy/api/deployments/v2/1/source?emulator_bytes={DOWNLOAD_BYTES}&emulator_chunk=16384"
            )))
            .send()
            .await;
        let response = match status_ok(sent, "401 replay refused (forced-refresh limit)") {
            Ok(response) => response,
            Err(outcome) => return outcome,
        };
        match response.bytes().await {
            Ok(body) if body == self.download_expected => Outcome::Ok,
            Ok(body) => Outcome::Unexpected(format!(
                "download corrupted: {} bytes of {DOWNLOAD_BYTES}",
                body.len()
            )),
            Err(e) => Outcome::Unexpected(format!("transport: {e}")),
        }
    }

    async fn abort(&self, rng: &mut impl Rng) -> Outcome {
        let id = rng.random_range(0..1000u32);
        let sent = self
            .http
            .get(self.url(&format!(
                "/deploy/api/deployments/v2/{id}/source?emulator_bytes={ABORTED_DOWNLOAD_BYTES}&emulator_chunk=65536&emulator_chunk_delay_ms=1"
            )))
            .send()
            .await;
        let mut response = match status_ok(sent, "401 replay refused (forced-refresh limit)") {
            Ok(response) => response,
            Err(outcome) => return outcome,
        };
        let mut received = 0usize;
        while received < ABORT_AFTER {
            match response.chunk().await {
                Ok(Some(chunk)) => received += chunk.len(),
                Ok(None) => {
                    return Outcome::Unexpected(format!("download ended early at {received} bytes"))
                }
                Err(e) => return Outcome::Unexpected(format!("transport: {e}")),
            }
        }
        // Dropping the response mid-body closes the connection under the proxy.
        drop(response);
        Outcome::Aborted
    }
}

/// The coarse kind of an unexpected error (the first words), for the table.
fn detail_kind(detail: &str) -> String {
    detail.split(':').next().unwrap_or(detail).to_owned()
}

/// A 200 response, or the outcome to record instead.
fn status_ok(
    sent: Result<reqwest::Response, reqwest::Error>,
    unauthorized_kind: &'static str,
) -> Result<reqwest::Response, Outcome> {
    let response = sent.map_err(|e| Outcome::Unexpected(format!("transport: {e}")))?;
    match response.status().as_u16() {
        200 => Ok(response),
        401 => Err(Outcome::Unauthorized(unauthorized_kind)),
        status => {
            let code = response
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            Err(Outcome::Unexpected(format!(
                "status {status}: request id {code}"
            )))
        }
    }
}

/// The emulator's JSON echo of a 200 response.
async fn echo(
    sent: Result<reqwest::Response, reqwest::Error>,
    unauthorized_kind: &'static str,
) -> Result<serde_json::Value, Outcome> {
    let response = status_ok(sent, unauthorized_kind)?;
    let text = response
        .text()
        .await
        .map_err(|e| Outcome::Unexpected(format!("transport: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Outcome::Unexpected(format!("not JSON: {e}")))
}

fn check_echo(echo: &serde_json::Value, api: &str, method: &str, digest: &str) -> Outcome {
    if echo["api"] != api || echo["method"] != method || echo["body_sha256"] != digest {
        return Outcome::Unexpected(format!(
            "echo mismatch: api {} method {} body {}",
            echo["api"], echo["method"], echo["body_sha256"]
        ));
    }
    Outcome::Ok
}

/// One row of the report.
struct Sample {
    at: Duration,
    tally: Tally,
    injected_401: u64,
    token_requests: u64,
    replays: u64,
    forced_refreshes: u64,
    rss_kib: u64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn row(previous: Option<&Sample>, s: &Sample) -> String {
    let zero = Tally::default();
    let p = previous.map_or(&zero, |p| &p.tally);
    let delta = |f: fn(&Tally) -> u64| f(&s.tally) - f(p);
    let before = |f: fn(&Sample) -> u64| previous.map_or(0, f);
    format!(
        "| {:>5.1} | {:>8} | {:>8} | {:>6} | {:>8} | {:>10} | {:>8} | {:>7} | {:>6} | {:>6} | {:>8.1} |",
        s.at.as_secs_f64() / 60.0,
        delta(|t| t.requests),
        delta(|t| t.ok),
        delta(|t| t.aborted),
        delta(Tally::unauthorized_total),
        delta(Tally::unexpected_total),
        s.injected_401 - before(|p| p.injected_401),
        s.replays - before(|p| p.replays),
        s.forced_refreshes - before(|p| p.forced_refreshes),
        s.token_requests - before(|p| p.token_requests),
        mib(s.rss_kib),
    )
}

const HEADER: &str = "| at (min) | requests | ok | client aborts | 401 to client (expected) | unexpected errors | 401s injected | replays | forced refreshes | token requests | RSS MiB |\n\
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes long; run with benches/soak.sh"]
async fn soak_mixed_load_with_refreshes_401s_and_aborts() {
    let duration = Duration::from_secs(env_secs("SOAK_SECONDS", 600));
    let interval = Duration::from_secs(env_secs("SOAK_SAMPLE_SECONDS", 60).max(1));
    let h = Harness::with(Setup {
        emulator: Emulator::builder()
            .token_lifetime(TOKEN_LIFETIME)
            .log_limit(1000),
        // The product's lifecycle timings: one forced refresh per 30 s, real backoff.
        tuning: Tuning::default(),
        ..Setup::default()
    })
    .await;
    h.wait_ready().await;
    let h = Arc::new(h);
    let credential = h.proxy.credential("automation").expect("credential");

    let upload_data = {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = vec![0u8; 4 * MIB];
        rng.fill(&mut data[..]);
        Bytes::from(data)
    };
    let upload_digests = UPLOAD_SIZES
        .iter()
        .map(|&n| hex::encode(Sha256::digest(&upload_data[..n])))
        .collect();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let load = Arc::new(Load {
        http,
        base: h.base.clone(),
        upload_data,
        upload_digests,
        download_expected: pattern_bytes(0, DOWNLOAD_BYTES),
        tally: Mutex::new(Tally::default()),
        first_errors: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });

    println!(
        "soak: {} s, {CONCURRENCY} workers, token lifetime {} s, a 401 every {} s, samples every {} s",
        duration.as_secs(),
        TOKEN_LIFETIME.as_secs(),
        UNAUTHORIZED_EVERY.as_secs(),
        interval.as_secs()
    );
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::with_capacity(CONCURRENCY);
    for id in 0..CONCURRENCY {
        let load = Arc::clone(&load);
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64);
            while !load.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let op = Op::pick(&mut rng);
                let outcome = load.run(op, &mut rng).await;
                load.record(op, outcome);
            }
        }));
    }

    let injected = Arc::new(AtomicU64::new(0));
    let injector = {
        let injected = Arc::clone(&injected);
        let h = Arc::clone(&h);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UNAUTHORIZED_EVERY);
            tick.tick().await;
            while Instant::now() + UNAUTHORIZED_EVERY / 2 < deadline {
                tick.tick().await;
                h.emulator
                    .push_upstream_faults([UpstreamFault::Status(401)]);
                injected.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let mut samples: Vec<Sample> = Vec::new();
    let mut next = started + interval;
    println!("{HEADER}");
    loop {
        let now = Instant::now();
        let at = next.min(deadline);
        if at > now {
            tokio::time::sleep(at - now).await;
        }
        let sample = Sample {
            at: started.elapsed(),
            tally: load.snapshot(),
            injected_401: injected.load(Ordering::SeqCst),
            token_requests: h.emulator.token_requests(),
            replays: h.proxy.metrics().replays.get(),
            forced_refreshes: credential.forced_refreshes(),
            rss_kib: rss_kib(),
        };
        println!("{}", row(samples.last(), &sample));
        samples.push(sample);
        if at >= deadline {
            break;
        }
        next += interval;
    }

    load.stop.store(true, Ordering::Relaxed);
    injector.abort();
    for worker in workers {
        worker.await.expect("worker");
    }
    let stats = h.proxy.metrics();
    let drained = support::eventually(Duration::from_secs(10), || stats.inflight.get() == 0).await;

    let total = load.snapshot();
    let injected_401 = injected.load(Ordering::SeqCst);
    let token_requests = h.emulator.token_requests();
    let forced = credential.forced_refreshes();
    let elapsed = started.elapsed();
    // A 401 reaches a client only because one was injected; more 401s than injections are not.
    let surplus_401 = total.unauthorized_total().saturating_sub(injected_401);
    // Scheduled refreshes come no sooner than 0.75 of the lifetime (refresh_at 0.8 minus up to
    // 5 % jitter); each forced refresh restarts that cycle.
    let token_budget =
        1 + (elapsed.as_secs_f64() / (TOKEN_LIFETIME.as_secs_f64() * 0.75)) as u64 + 2 * forced;
    let forced_budget = 1 + elapsed.as_secs() / 30;

    let second = samples.get(1).map(|s| s.rss_kib);
    let last = samples.last().map(|s| s.rss_kib).unwrap_or(0);
    let rss_ok = match second {
        Some(second) if samples.len() >= 3 => (last as f64) <= second as f64 * RSS_GROWTH_LIMIT,
        _ => true,
    };

    let mut report = String::new();
    let _ = writeln!(report, "# Soak report\n");
    let _ = writeln!(
        report,
        "Written by `tests/soak.rs` (`benches/soak.sh {}`), release build. {} s of mixed load, \
         {CONCURRENCY} concurrent workers, through the proxy to the in-process emulator on \
         127.0.0.1. Token lifetime {} s with `refresh_at = 0.8` (a background refresh about \
         every 30 s); one upstream 401 injected every {} s; product lifecycle timings (one \
         forced refresh per credential per 30 s). RSS is the whole test process: load \
         generator, emulator and proxy. Rows are per sample interval ({} s); RSS at the \
         sample.\n",
        duration.as_secs(),
        duration.as_secs(),
        TOKEN_LIFETIME.as_secs(),
        UNAUTHORIZED_EVERY.as_secs(),
        interval.as_secs(),
    );
    let _ = writeln!(report, "{HEADER}");
    for (i, sample) in samples.iter().enumerate() {
        let previous = i.checked_sub(1).and_then(|p| samples.get(p));
        let _ = writeln!(report, "{}", row(previous, sample));
    }
    let _ = writeln!(report, "\n## Totals\n");
    let _ = writeln!(report, "| what | count |\n|---|---:|");
    let _ = writeln!(report, "| requests | {} |", total.requests);
    for (op, n) in &total.by_op {
        let _ = writeln!(report, "| - {} | {n} |", op.name());
    }
    let _ = writeln!(report, "| ok | {} |", total.ok);
    let _ = writeln!(report, "| client aborts (intended) | {} |", total.aborted);
    for (kind, n) in &total.unauthorized {
        let _ = writeln!(report, "| expected: {kind} | {n} |");
    }
    let _ = writeln!(
        report,
        "| unexpected errors | {} |",
        total.unexpected_total() + surplus_401
    );
    for (kind, n) in &total.unexpected {
        let _ = writeln!(report, "| - unexpected: {kind} | {n} |");
    }
    if surplus_401 > 0 {
        let _ = writeln!(
            report,
            "| - unexpected: 401s beyond the injected ones | {surplus_401} |"
        );
    }
    let _ = writeln!(report, "| upstream 401s injected | {injected_401} |");
    let _ = writeln!(report, "| replays after a 401 | {} |", stats.replays.get());
    let _ = writeln!(
        report,
        "| forced refreshes (budget {forced_budget}) | {forced} |"
    );
    let _ = writeln!(
        report,
        "| token requests (budget {token_budget}) | {token_requests} |"
    );
    let _ = writeln!(
        report,
        "| requests that waited on a cold cache | {} |",
        credential.cold_waits()
    );
    let _ = writeln!(
        report,
        "| in-flight gauge after the load | {} |",
        stats.inflight.get()
    );
    let _ = writeln!(
        report,
        "| RSS MiB: 2nd sample / last sample (limit x{RSS_GROWTH_LIMIT}) | {} / {:.1} |",
        second.map_or_else(|| "-".to_owned(), |s| format!("{:.1}", mib(s))),
        mib(last)
    );
    let errors = load
        .first_errors
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if !errors.is_empty() {
        let _ = writeln!(report, "\nFirst unexpected errors:\n");
        for e in &errors {
            let _ = writeln!(report, "- {e}");
        }
    }
    let verdict = total.unexpected_total() == 0
        && surplus_401 == 0
        && drained
        && rss_ok
        && token_requests <= token_budget
        && forced <= forced_budget;
    let _ = writeln!(
        report,
        "\nVerdict: {}",
        if verdict {
            "pass (zero unexpected errors, no RSS growth trend, token requests within budget)."
        } else {
            "FAIL."
        }
    );
    println!("\n{report}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/soak-report.md");
    std::fs::write(path, &report).expect("write benches/soak-report.md");

    assert_eq!(
        total.unexpected_total(),
        0,
        "unexpected errors: {:?}\n{errors:#?}",
        total.unexpected
    );
    assert_eq!(
        surplus_401, 0,
        "more 401s reached clients than were injected"
    );
    assert!(drained, "the in-flight gauge returns to 0");
    assert!(
        token_requests <= token_budget,
        "{token_requests} token requests, budget {token_budget}"
    );
    assert!(
        forced <= forced_budget,
        "{forced} forced refreshes, budget {forced_budget}"
    );
    assert!(
        total.ok > total.requests / 2,
        "most requests succeeded: {} of {}",
        total.ok,
        total.requests
    );
    assert!(
        rss_ok,
        "RSS grew from {:?} KiB (2nd sample) to {last} KiB (last)",
        second
    );
}
