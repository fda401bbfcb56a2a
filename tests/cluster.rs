//! Fleet mode (`[cluster]`, DESIGN.md "One gateway for many teams, across replicas") with a real
//! `redis-server` started by each test on a free loopback port, and several replicas of the
//! proxy in this process sharing it: token requests counted by the emulator, requests admitted by
//! a fleet-wide rate, and what survives Redis being absent, killed, frozen, restarted empty or
//! refusing the password. Waits are polled with "not a hang" bounds; nothing asserts a duration.

mod support;

use std::time::Duration;

use http::HeaderValue;
use redis::AsyncCommands;
use sitecore_auth_proxy::app::{self, Options, RunningProxy};
use sitecore_auth_proxy::cluster::seal::Sealer;
use sitecore_auth_proxy::emulator::{Emulator, TokenFault, UpstreamFault};
use support::redis::{RedisOptions, RedisServer};
use support::{eventually, fast_tuning, parse, samples, Setup};
use tokio::task::JoinSet;

const PATH: &str = "/deploy/api/projects/v1";
const NOT_A_HANG: Duration = Duration::from_secs(15);
const PREFIX: &str = "fleet-test:";

/// The standard routes against `emulator`, an admin listener, and `[cluster]` on `redis_url`
/// (`timeout` generous: on a loaded two-core machine a 50 ms budget would make the counts
/// depend on the scheduler), plus `extra` (more tables, such as `[[clients]]`).
fn fleet_text(emulator: &Emulator, redis_url: &str, timeout: &str, extra: &str) -> String {
    let mut text = support::config_text(&Setup::default(), emulator);
    text.push_str(&format!(
        "\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[cluster]\nredis_url = \"{redis_url}\"\n\
         key_prefix = \"{PREFIX}\"\nsync_interval = \"50ms\"\ntimeout = \"{timeout}\"\n{extra}\n"
    ));
    text
}

async fn replica(text: &str) -> RunningProxy {
    let options = Options {
        tuning: fast_tuning(),
        ..Options::default()
    };
    app::start(parse(text), options)
        .await
        .expect("replica starts")
}

/// `n` replicas started at once.
async fn replicas(text: &str, n: usize) -> Vec<RunningProxy> {
    let mut started = Vec::new();
    for proxy in futures_util::future::join_all((0..n).map(|_| replica(text))).await {
        started.push(proxy);
    }
    started
}

async fn emulator(prepare: impl FnOnce(&Emulator)) -> Emulator {
    let emulator = Setup::default()
        .emulator
        .start()
        .await
        .expect("emulator starts");
    prepare(&emulator);
    emulator
}

fn url(proxy: &RunningProxy, path: &str) -> String {
    format!("http://{}{path}", proxy.local_addr())
}

fn admin(proxy: &RunningProxy, path: &str) -> String {
    format!("http://{}{path}", proxy.admin_addr().expect("admin"))
}

async fn status_of(proxy: &RunningProxy) -> serde_json::Value {
    support::json(
        support::client()
            .get(admin(proxy, "/status"))
            .send()
            .await
            .expect("status"),
    )
    .await
}

async fn metrics_of(proxy: &RunningProxy) -> std::collections::HashMap<String, f64> {
    let text = support::client()
        .get(admin(proxy, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    samples(&text)
}

/// Waits until every replica holds a token.
async fn wait_tokens(fleet: &[RunningProxy]) {
    for proxy in fleet {
        let credential = proxy.credential("automation").expect("credential");
        assert!(
            eventually(NOT_A_HANG, || credential.current().is_some()).await,
            "a replica never got a token"
        );
    }
}

/// Waits until every replica has seen `n` replicas in the fleet.
async fn wait_fleet(fleet: &[RunningProxy], n: usize) {
    for proxy in fleet {
        let cluster = proxy.shared().cluster.clone().expect("clustered");
        assert!(
            eventually(NOT_A_HANG, || cluster.is_up()
                && cluster.fleet().replicas.len() == n)
            .await,
            "a replica did not see {n} replicas: {:?}",
            cluster
                .fleet()
                .replicas
                .iter()
                .map(|p| &p.name)
                .collect::<Vec<_>>()
        );
    }
}

/// `total` GETs spread round-robin over the replicas, all at once; their statuses.
async fn spread(fleet: &[RunningProxy], total: usize) -> Vec<u16> {
    let http = support::client();
    let mut tasks = JoinSet::new();
    for i in 0..total {
        let target = url(&fleet[i % fleet.len()], PATH);
        let http = http.clone();
        tasks.spawn(async move {
            http.get(target)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        });
    }
    tasks.join_all().await
}

fn all_ok(statuses: &[u16]) -> bool {
    statuses.iter().all(|s| *s == 200)
}

/// Every key and value in Redis, as text, for "nothing secret in Redis".
async fn redis_dump(redis: &RedisServer) -> String {
    let mut conn = redis.connection().await;
    let keys: Vec<String> = conn.keys("*").await.expect("KEYS");
    let mut dump = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("TYPE");
        let value = match kind.as_str() {
            "string" => {
                let v: Vec<u8> = conn.get(&key).await.expect("GET");
                String::from_utf8_lossy(&v).into_owned()
            }
            "zset" => {
                let v: Vec<String> = conn.zrange(&key, 0, -1).await.expect("ZRANGE");
                v.join(",")
            }
            other => format!("<{other}>"),
        };
        dump.push_str(&format!("{key} = {value}\n"));
    }
    dump
}

/// The key of the shared token entry.
async fn token_key(redis: &RedisServer) -> String {
    let mut conn = redis.connection().await;
    let keys: Vec<String> = conn.keys(format!("{PREFIX}token:*")).await.expect("KEYS");
    assert_eq!(keys.len(), 1, "one shared entry: {keys:?}");
    keys[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_fleet_makes_one_token_request_and_a_restarted_one_none() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    // The token endpoint answers late, so all 300 requests arrive while the first fetch runs.
    let emulator =
        emulator(|e| e.set_token_fault(Some(TokenFault::Delay(Duration::from_millis(400))))).await;
    let text = fleet_text(&emulator, &redis.url(), "500ms", "");
    let fleet = replicas(&text, 3).await;
    let statuses = spread(&fleet, 300).await;
    assert!(all_ok(&statuses), "statuses: {statuses:?}");
    assert_eq!(
        emulator.token_requests(),
        1,
        "one token request for the fleet"
    );
    let adoptions: u64 = fleet
        .iter()
        .map(|p| {
            p.credential("automation")
                .expect("credential")
                .fleet_adoptions()
        })
        .sum();
    assert_eq!(adoptions, 2, "the other two replicas took the shared token");

    // Redis holds neither the token nor the client secret in clear.
    let token = fleet[0]
        .credential("automation")
        .and_then(|c| c.current())
        .expect("token");
    let jwt = token
        .authorization
        .to_str()
        .expect("ascii")
        .trim_start_matches("Bearer ")
        .to_owned();
    let dump = redis_dump(&redis).await;
    assert!(
        dump.contains(&format!("{PREFIX}token:automation:")),
        "{dump}"
    );
    assert!(
        !dump.contains(&jwt[jwt.len() - 20..]),
        "token in clear: {dump}"
    );
    assert!(!dump.contains(sitecore_auth_proxy::emulator::DEFAULT_CLIENT_SECRET));

    // All three restarted: they serve the shared token without asking the endpoint.
    drop(fleet);
    let fleet = replicas(&text, 3).await;
    let statuses = spread(&fleet, 30).await;
    assert!(all_ok(&statuses), "statuses: {statuses:?}");
    assert_eq!(
        emulator.token_requests(),
        1,
        "no token request after the restart"
    );
    let metrics = metrics_of(&fleet[0]).await;
    assert_eq!(
        metrics.get("token_fleet_adoptions_total{credential=\"automation\"}"),
        Some(&1.0)
    );
    assert_eq!(metrics.get("cluster_up"), Some(&1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_storm_costs_the_fleet_one_forced_refresh() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    let text = fleet_text(&emulator, &redis.url(), "500ms", "");
    let fleet = replicas(&text, 3).await;
    wait_tokens(&fleet).await;
    assert!(all_ok(&spread(&fleet, 6).await));
    assert_eq!(emulator.token_requests(), 1);
    let tokens = || -> Vec<Option<HeaderValue>> {
        fleet
            .iter()
            .map(|p| {
                let credential = p.credential("automation").expect("credential");
                credential.current().map(|t| t.authorization.clone())
            })
            .collect()
    };
    let first = tokens()[0].clone().expect("a token");

    // Every upstream refuses every token: each replica drops its token and wants a new one.
    emulator.set_upstream_fault(Some(UpstreamFault::Status(401)));
    let statuses = spread(&fleet, 90).await;
    assert!(statuses.iter().all(|s| *s == 401), "statuses: {statuses:?}");
    // The replica that won the fleet's forced refresh shares its token; the others serve the
    // refused one meanwhile and take the new one at their next look (every 25 ms).
    let converged = || {
        let now = tokens();
        now.windows(2).all(|w| w[0] == w[1]) && now[0].as_ref().is_some_and(|t| *t != first)
    };
    assert!(
        eventually(NOT_A_HANG, converged).await,
        "one new token fleet-wide"
    );
    let _ = spread(&fleet, 30).await;
    assert_eq!(
        emulator.token_requests(),
        2,
        "one forced refresh for the whole fleet within the interval"
    );

    // The upstream accepts again: every replica serves the one new token.
    emulator.set_upstream_fault(None);
    assert!(all_ok(&spread(&fleet, 30).await));
    assert!(converged(), "still one new token fleet-wide");
    assert_eq!(emulator.token_requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_or_foreign_entry_is_refused() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    let text = fleet_text(&emulator, &redis.url(), "500ms", "");
    let first = replica(&text).await;
    wait_tokens(std::slice::from_ref(&first)).await;
    assert_eq!(emulator.token_requests(), 1);
    let key = token_key(&redis).await;
    let mut conn = redis.connection().await;

    // Tampered: one bit of the ciphertext flipped.
    let mut entry: Vec<u8> = conn.get(&key).await.expect("GET");
    let last = entry.len() - 1;
    entry[last] ^= 0x01;
    let _: () = conn.set_ex(&key, entry, 600).await.expect("SET");
    let second = replica(&text).await;
    wait_tokens(std::slice::from_ref(&second)).await;
    assert_eq!(
        emulator.token_requests(),
        2,
        "the tampered entry was refused"
    );
    assert!(all_ok(&spread(std::slice::from_ref(&second), 5).await));

    // Foreign: sealed with another secret, holding a token that would verify (the first
    // replica's). Whoever can write to Redis but lacks the secret cannot plant a token.
    let planted = first
        .credential("automation")
        .and_then(|c| c.current())
        .expect("token");
    let jwt = planted
        .authorization
        .to_str()
        .expect("ascii")
        .trim_start_matches("Bearer ")
        .to_owned();
    let foreign = Sealer::new(b"not the client secret", &key);
    let plaintext = serde_json::json!({
        "access_token": jwt,
        "obtained_at_ms": 0,
        "serve_until_ms": u64::MAX / 2,
        "refresh_due_ms": u64::MAX / 2,
    })
    .to_string();
    let sealed = foreign
        .seal(&foreign.fingerprint(&jwt), plaintext.as_bytes())
        .expect("sealed");
    let _: () = conn.set_ex(&key, sealed, 600).await.expect("SET");
    let third = replica(&text).await;
    wait_tokens(std::slice::from_ref(&third)).await;
    assert_eq!(
        emulator.token_requests(),
        3,
        "the foreign entry was refused"
    );

    // The refusing replica replaced the entry with its own: the next one adopts it.
    let fourth = replica(&text).await;
    wait_tokens(std::slice::from_ref(&fourth)).await;
    assert_eq!(emulator.token_requests(), 3);

    // Garbage of any shape (here one byte) is replaced too, and the fleet converges again.
    let _: () = conn.set(&key, "x").await.expect("SET");
    let fifth = replica(&text).await;
    wait_tokens(std::slice::from_ref(&fifth)).await;
    assert_eq!(emulator.token_requests(), 4, "the garbage was refused");
    let sixth = replica(&text).await;
    wait_tokens(std::slice::from_ref(&sixth)).await;
    assert_eq!(emulator.token_requests(), 4, "and replaced");
    drop((first, second, third, fourth, fifth, sixth));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_after_the_fleet_spent_its_forced_refresh_keeps_the_token() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    let text = fleet_text(&emulator, &redis.url(), "500ms", "");
    let first = replica(&text).await;
    wait_tokens(std::slice::from_ref(&first)).await;
    emulator.set_upstream_fault(Some(UpstreamFault::Status(401)));
    // The first replica spends the fleet's forced refresh and shares the new token.
    assert_eq!(spread(std::slice::from_ref(&first), 1).await, [401]);
    assert!(eventually(NOT_A_HANG, || emulator.token_requests() == 2).await);
    let credential = first.credential("automation").expect("credential");
    assert!(eventually(NOT_A_HANG, || credential.current().is_some()).await);

    // A replica that starts now adopts that token, with its own forced-refresh budget untouched.
    let late = replica(&text).await;
    wait_tokens(std::slice::from_ref(&late)).await;
    // The upstream refuses it too: the fleet's budget is spent, so the 401 goes back at once and
    // the replica keeps serving the fleet's token, as a single proxy keeps its own.
    let statuses = spread(std::slice::from_ref(&late), 3).await;
    assert_eq!(statuses, [401, 401, 401]);
    let credential = late.credential("automation").expect("credential");
    assert!(credential.current().is_some(), "the token was kept");
    assert_eq!(emulator.token_requests(), 2, "no second forced refresh");
    drop((first, late));
}

/// Three replicas whose client `ci` has `rate = "50/s"` with a small burst (so a 10 s figure is
/// the rate's, not the burst's), holding tokens and seeing each other.
async fn rate_limited_fleet(emulator: &Emulator, redis: &RedisServer) -> Vec<RunningProxy> {
    let client = "\n[[clients]]\nname = \"ci\"\nkey = \"ci-key-0123456789abcdef\"\nrate = \"50/s\"\nburst = 5\n";
    let text = fleet_text(emulator, &redis.url(), "500ms", client);
    let fleet = replicas(&text, 3).await;
    wait_tokens(&fleet).await;
    wait_fleet(&fleet, 3).await;
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_holds_for_the_fleet_as_a_whole() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    let fleet = rate_limited_fleet(&emulator, &redis).await;

    // Offer about 150 requests a second, round-robin over the replicas, for 10 s.
    let http = support::client();
    let urls: Vec<String> = fleet.iter().map(|p| url(p, PATH)).collect();
    let mut tasks = JoinSet::new();
    let duration = Duration::from_secs(10);
    for worker in 0..6 {
        let http = http.clone();
        let urls = urls.clone();
        tasks.spawn(async move {
            let mut statuses = Vec::new();
            let start = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(40));
            let mut i = worker;
            while start.elapsed() < duration {
                tick.tick().await;
                let status = http
                    .get(&urls[i % urls.len()])
                    .header("x-api-key", "ci-key-0123456789abcdef")
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                statuses.push(status);
                i += 1;
            }
            statuses
        });
    }
    let statuses: Vec<u16> = tasks.join_all().await.into_iter().flatten().collect();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(admitted + refused, statuses.len(), "only 200 and 429");
    eprintln!(
        "the fleet admitted {admitted} of {} in 10 s",
        statuses.len()
    );
    // 50/s for 10 s is 500; within 10 %, the burst included.
    assert!(
        (450..=550).contains(&admitted),
        "the fleet admitted {admitted} of {} in 10 s",
        statuses.len()
    );
    // Each replica enforces about a third.
    let status = status_of(&fleet[0]).await;
    let share = status["clients"][0]["limits"]["share"]
        .as_f64()
        .expect("share");
    assert!((0.2..=0.5).contains(&share), "share {share}");
}

/// Requests keep succeeding on every replica while `fault` runs, the replicas say Redis is down,
/// and after `heal` they see each other again.
async fn survives(fault: impl FnOnce(&mut RedisServer), heal: impl AsyncFnOnce(&mut RedisServer)) {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    let client =
        "\n[[clients]]\nname = \"ci\"\nkey = \"ci-key-0123456789abcdef\"\nrate = \"300/s\"\n";
    let text = fleet_text(&emulator, &redis.url(), "100ms", client);
    let fleet = replicas(&text, 2).await;
    wait_tokens(&fleet).await;
    wait_fleet(&fleet, 2).await;
    let keyed = |proxy: &RunningProxy| {
        support::client()
            .get(url(proxy, PATH))
            .header("x-api-key", "ci-key-0123456789abcdef")
    };

    fault(&mut redis);
    // While Redis is unavailable, every request succeeds on every replica.
    for round in 0..20 {
        for proxy in &fleet {
            let status = keyed(proxy).send().await.expect("response").status();
            assert_eq!(status, 200, "round {round}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for proxy in &fleet {
        let cluster = proxy.shared().cluster.clone().expect("clustered");
        assert!(
            eventually(NOT_A_HANG, || !cluster.is_up()).await,
            "cluster_up stays 1"
        );
        let metrics = metrics_of(proxy).await;
        assert_eq!(metrics.get("cluster_up"), Some(&0.0));
        assert!(metrics["cluster_sync_errors_total"] >= 1.0);
        let status = status_of(proxy).await;
        assert_eq!(status["cluster"]["up"], false);
        assert!(status["cluster"]["last_error"].is_string());
        // Each replica enforces the rate divided by the two replicas it last saw.
        assert_eq!(status["clients"][0]["limits"]["share"], 0.5);
    }
    // A replica that starts now gets its own token without waiting on Redis.
    let late = replica(&text).await;
    wait_tokens(std::slice::from_ref(&late)).await;
    assert_eq!(keyed(&late).send().await.expect("response").status(), 200);

    heal(&mut redis).await;
    let mut all = fleet;
    all.push(late);
    wait_fleet(&all, 3).await;
    for proxy in &all {
        let status = status_of(proxy).await;
        assert_eq!(status["cluster"]["up"], true);
        assert_eq!(
            status["cluster"]["replicas"].as_array().map(Vec::len),
            Some(3)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_traffic_then_back() {
    survives(|redis| redis.kill(), async |redis| redis.restart().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_then_thawed() {
    survives(|redis| redis.freeze(), async |redis| redis.thaw()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_absent_at_start_then_up() {
    let Some(mut redis) = RedisServer::absent() else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    let text = fleet_text(&emulator, &redis.url(), "100ms", "");
    let proxy = replica(&text).await;
    wait_tokens(std::slice::from_ref(&proxy)).await;
    assert!(all_ok(&spread(std::slice::from_ref(&proxy), 10).await));
    let metrics = metrics_of(&proxy).await;
    assert_eq!(metrics.get("cluster_up"), Some(&0.0));
    assert_eq!(status_of(&proxy).await["cluster"]["up"], false);

    redis.restart().await;
    wait_fleet(std::slice::from_ref(&proxy), 1).await;
    assert_eq!(metrics_of(&proxy).await.get("cluster_up"), Some(&1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_and_the_fleet_converges() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    let text = fleet_text(&emulator, &redis.url(), "500ms", "");
    let fleet = replicas(&text, 2).await;
    wait_tokens(&fleet).await;
    wait_fleet(&fleet, 2).await;
    assert_eq!(emulator.token_requests(), 1);

    redis.restart().await;
    assert!(all_ok(&spread(&fleet, 20).await));
    wait_fleet(&fleet, 2).await;
    // The shared entry is gone: a new replica fetches once and shares it, the next one adopts.
    let third = replica(&text).await;
    wait_tokens(std::slice::from_ref(&third)).await;
    assert_eq!(emulator.token_requests(), 2);
    let fourth = replica(&text).await;
    wait_tokens(std::slice::from_ref(&fourth)).await;
    assert_eq!(emulator.token_requests(), 2);
    let mut all = fleet;
    all.extend([third, fourth]);
    wait_fleet(&all, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_and_never_shown() {
    let options = RedisOptions {
        password: Some("right-horse-battery".to_owned()),
        ..RedisOptions::default()
    };
    let Some(redis) = RedisServer::start_with(options).await else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    let wrong = redis.url_with_password(Some("wrong-staple-9f8e7d"));
    let text = fleet_text(&emulator, &wrong, "200ms", "");
    let proxy = replica(&text).await;
    wait_tokens(std::slice::from_ref(&proxy)).await;
    assert!(all_ok(&spread(std::slice::from_ref(&proxy), 5).await));
    let cluster = proxy.shared().cluster.clone().expect("clustered");
    // Between attempts the client backs off, and an exchange in that pause times out; the
    // refusal itself is what the replica reports once an attempt completes.
    let refused = || cluster.store().last_error().as_deref() == Some("authentication failed");
    assert!(
        eventually(NOT_A_HANG, refused).await,
        "last error: {:?}",
        cluster.store().last_error()
    );
    let status = status_of(&proxy).await;
    assert_eq!(status["cluster"]["up"], false);
    assert!(status["cluster"]["last_error"].is_string());
    let shown = status.to_string();
    assert!(!shown.contains("wrong-staple"), "{shown}");
    assert_eq!(
        status["cluster"]["redis"],
        format!("redis://127.0.0.1:{}/0", redis.port())
    );

    // The right password: the replica joins.
    let text = fleet_text(&emulator, &redis.url(), "500ms", "");
    let joined = replica(&text).await;
    wait_fleet(std::slice::from_ref(&joined), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_is_verified_against_upstream_ca() {
    let dir = support::tls::temp_dir("rediss");
    let (files, ca) = support::redis::tls_files(&dir);
    let options = RedisOptions {
        tls: Some(files),
        ..RedisOptions::default()
    };
    let Some(redis) = RedisServer::start_with(options).await else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    let ca_file = support::tls::write(&dir, "upstream-ca.pem", &ca.pem());

    // Without the CA the server is not trusted.
    let text = fleet_text(&emulator, &redis.url(), "500ms", "");
    let untrusted = replica(&text).await;
    let cluster = untrusted.shared().cluster.clone().expect("clustered");
    assert!(eventually(NOT_A_HANG, || cluster.store().last_error().is_some()).await);
    assert!(!cluster.is_up());

    // With it in upstream_ca, the replica joins.
    let text = text.replacen(
        "[server]\n",
        &format!("[server]\nupstream_ca = [\"{}\"]\n", ca_file.display()),
        1,
    );
    let trusted = replica(&text).await;
    wait_fleet(std::slice::from_ref(&trusted), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_all_the_traffic_gets_most_of_the_rate() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let emulator = emulator(|_| {}).await;
    // A client whose keep-alive connection lands on one replica: the limit follows it there.
    let fleet = rate_limited_fleet(&emulator, &redis).await;
    let http = support::client();
    let target = url(&fleet[0], PATH);
    let offer = async |seconds: u64| {
        let mut admitted = 0;
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(7));
        while start.elapsed() < Duration::from_secs(seconds) {
            tick.tick().await;
            let response = http
                .get(&target)
                .header("x-api-key", "ci-key-0123456789abcdef")
                .send()
                .await
                .expect("response");
            admitted += usize::from(response.status() == 200);
        }
        admitted
    };
    // Two seconds for the demand to show, then five measured.
    offer(2).await;
    let admitted = offer(5).await;
    eprintln!("one replica of three admitted {admitted} in 5 s");
    // The idle replicas keep a tenth of an equal share each: about 94 % of 250 here.
    assert!((200..=260).contains(&admitted), "admitted {admitted}");
    let share = status_of(&fleet[0]).await["clients"][0]["limits"]["share"]
        .as_f64()
        .expect("share");
    assert!(share > 0.85, "share {share}");
}

/// Counts log lines containing `needle`.
fn lines_with(logs: &str, needle: &str) -> usize {
    logs.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test]
async fn one_log_line_per_change_of_redis_health() {
    use sitecore_auth_proxy::logging::{self, memory::MemoryWriter, Format};
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let capture = MemoryWriter::default();
    // The fleet's exchange runs on this (current-thread) runtime, so a thread-scoped subscriber
    // sees every line it logs.
    let _scope = tracing::dispatcher::set_default(&logging::subscriber(
        Format::Text,
        "info",
        capture.clone(),
        false,
    ));
    let emulator = emulator(|_| {}).await;
    let text = fleet_text(&emulator, &redis.url(), "100ms", "");
    let proxy = replica(&text).await;
    wait_fleet(std::slice::from_ref(&proxy), 1).await;
    let cluster = proxy.shared().cluster.clone().expect("clustered");

    redis.kill();
    assert!(eventually(NOT_A_HANG, || !cluster.is_up()).await);
    // Twenty exchanges fail meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart().await;
    assert!(eventually(NOT_A_HANG, || cluster.is_up()).await);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let logs = capture.contents();
    // At most: a callsite first hit by a concurrent test on another thread can miss a scoped
    // subscriber (tracing caches interest per callsite), and the first line is not a change.
    assert!(
        lines_with(&logs, "cluster: Redis answers; sharing") <= 1,
        "{logs}"
    );
    assert_eq!(
        lines_with(&logs, "cluster: Redis is unavailable"),
        1,
        "{logs}"
    );
    assert_eq!(
        lines_with(&logs, "cluster: Redis answers again"),
        1,
        "{logs}"
    );
    assert!(cluster.store().last_error().is_none());
}
