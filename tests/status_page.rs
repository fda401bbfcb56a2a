//! The status page as a person sees it: the proxy serves traffic, headless Chromium loads the
//! page from the admin listener over loopback, runs its JavaScript and hands back the DOM it
//! drew and a screenshot (`target/status-page.png`).
//!
//! Needs `/usr/bin/chromium` (Debian's `chromium`, installed by `.ci/run`). Without it the test
//! fails when `CI` is set, and otherwise skips with a note.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sitecore_auth_proxy::emulator::{Api, Emulator};
use support::tls::temp_dir;
use support::{fast_tuning, Harness, Setup};

const CHROMIUM: &str = "/usr/bin/chromium";
const SECRET: &str = "cs-page-MARKER-5b1e";
const DOCS_KEY: &str = "ck-docs-MARKER-90af";
const CI_KEY: &str = "ck-ci-MARKER-13c7";

/// Whether Chromium is there; without it, skipping is allowed only outside CI.
fn chromium_available() -> bool {
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{CHROMIUM} is missing and CI is set: .ci/run installs it (apt-get install chromium)"
    );
    eprintln!("note: {CHROMIUM} is not installed; the status page browser test is skipped");
    false
}

/// Runs headless Chromium on `url` with `args`, from a fresh profile, and returns its stdout.
/// It runs on a blocking thread, so the test's runtime keeps serving the admin listener, and is
/// killed if it takes longer than a minute.
async fn chromium(url: String, args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let profile = temp_dir("chromium-profile");
        let out_path = profile.join("stdout.html");
        let out = std::fs::File::create(&out_path).expect("stdout file");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!(
                "--user-data-dir={}",
                profile.join("data").display()
            ))
            .args(&args)
            .arg(&url)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for chromium") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish within a minute");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "chromium failed: {status}");
        let text = std::fs::read_to_string(&out_path).expect("chromium output");
        let _ = std::fs::remove_dir_all(&profile);
        text
    })
    .await
    .expect("chromium thread")
}

/// The DOM after the page's JavaScript ran for six seconds of virtual time: the first render
/// from the embedded document, and at least one refresh fetched from `/status`.
async fn dump_dom(url: &str) -> String {
    chromium(
        url.to_owned(),
        vec!["--dump-dom".into(), "--virtual-time-budget=6000".into()],
    )
    .await
}

/// The `<tr>` whose `attribute` is `value` (rows hold no nested table).
fn row<'a>(dom: &'a str, attribute: &str, value: &str) -> &'a str {
    let start = dom
        .find(&format!("<tr {attribute}=\"{value}\""))
        .unwrap_or_else(|| panic!("no row with {attribute}={value:?} in the page"));
    let end = dom[start..].find("</tr>").expect("row end") + start;
    &dom[start..end]
}

/// The number in the first `data-<name>="N"` attribute of `html`.
fn data_number(html: &str, name: &str) -> u64 {
    let key = format!("data-{name}=\"");
    let at = html
        .find(&key)
        .unwrap_or_else(|| panic!("no {key} in {html}"))
        + key.len();
    let digits: String = html[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("a number")
}

/// `/status` JSON until `done` holds for it (the history shows complete 5 s buckets only).
async fn status_until(h: &Harness, admin: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: serde_json::Value = h
            .http
            .get(format!("{admin}/status"))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status JSON");
        if done(&status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "status never got there: {status}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn route_total(status: &serde_json::Value, prefix: &str) -> u64 {
    status["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["prefix"] == prefix)
        .map(|r| {
            r["history"]["requests"]
                .as_array()
                .expect("requests")
                .iter()
                .filter_map(serde_json::Value::as_u64)
                .sum()
        })
        .expect("route")
}

async fn send(h: &Harness, key: &str, path: &str, times: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..times {
        let response = h
            .http
            .get(h.url(path))
            .header("x-api-key", key)
            .send()
            .await
            .expect("response");
        statuses.push(response.status().as_u16());
    }
    statuses
}

fn screenshot_path() -> PathBuf {
    // CARGO_TARGET_TMPDIR is target/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target directory")
        .join("status-page.png")
}

#[tokio::test]
async fn the_status_page_draws_live_charts_and_never_a_secret() {
    if !chromium_available() {
        return;
    }
    let setup = Setup {
        emulator: Emulator::builder().client("page-client", SECRET),
        client_id: "page-client".into(),
        client_secret: SECRET.into(),
        ..Setup::default()
    };
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    let mut text = support::config_text(&setup, &emulator);
    text.push_str(&format!(
        "\n[[routes]]\nprefix = \"/edge-limited\"\nupstream = \"{}\"\ncredential = \"automation\"\n\
         rate = \"50/s\"\nmax_in_flight = 8\n\
         \n[[routes]]\nprefix = \"/gone\"\nupstream = \"http://127.0.0.1:1\"\ncredential = \"automation\"\n\
         \n[admin]\nlisten = \"127.0.0.1:0\"\n\
         \n[[clients]]\nname = \"team-docs\"\nkey = \"{DOCS_KEY}\"\nrate = \"1/s\"\nburst = 1\n\
         \n[[clients]]\nname = \"team-ci\"\nkey = \"{CI_KEY}\"\n",
        emulator.api_base(Api::EdgeAdmin)
    ));
    let h = Harness::from_text(emulator, &text, fast_tuning()).await;
    h.wait_ready().await;
    let admin = format!("http://{}", h.proxy.admin_addr().expect("admin listener"));
    let token = h
        .proxy
        .credential("automation")
        .expect("credential")
        .current()
        .expect("token")
        .authorization
        .to_str()
        .expect("ascii")
        .trim_start_matches("Bearer ")
        .to_owned();

    assert!(send(&h, CI_KEY, "/deploy/x", 12)
        .await
        .iter()
        .all(|&s| s == 200));
    assert!(send(&h, CI_KEY, "/authoring", 5)
        .await
        .iter()
        .all(|&s| s == 200));
    assert!(send(&h, CI_KEY, "/edge-limited/x", 6)
        .await
        .iter()
        .all(|&s| s == 200));
    assert!(send(&h, CI_KEY, "/gone/x", 3)
        .await
        .iter()
        .all(|&s| s == 502));
    let docs = send(&h, DOCS_KEY, "/edge-admin/x", 6).await;
    assert!(docs.contains(&200) && docs.contains(&429), "{docs:?}");
    status_until(&h, &admin, |s| route_total(s, "/deploy") == 12).await;

    let url = format!("{admin}/status");
    let first = dump_dom(&url).await;
    for (prefix, _) in support::ROUTES
        .iter()
        .chain(&[("/edge-limited", Api::EdgeAdmin), ("/gone", Api::Deploy)])
    {
        let route = row(&first, "data-route", prefix);
        // Requests, errors and latency: three charts, each drawn.
        assert_eq!(route.matches("<svg").count(), 3, "{prefix}: {route}");
        assert!(route.contains("<path"), "{prefix}: {route}");
    }
    let deploy = row(&first, "data-route", "/deploy");
    assert_eq!(data_number(deploy, "total"), 12);
    assert!(
        deploy.contains("p50 <b>") && deploy.contains(" ms</b>"),
        "{deploy}"
    );
    // Failures and refusals are drawn as bars.
    assert!(row(&first, "data-route", "/gone").contains("<rect"));
    assert!(row(&first, "data-route", "/edge-admin").contains("<rect"));
    assert!(row(&first, "data-route", "/edge-limited").contains("50/s (burst 50)"));
    let credential = row(&first, "data-credential", "automation");
    assert!(credential.contains(">up<"), "{credential}");
    assert!(credential.contains("refresh due") && credential.contains("expires"));
    assert!(
        credential.contains("<rect"),
        "the timeline is drawn: {credential}"
    );
    let docs_row = row(&first, "data-client", "team-docs");
    assert!(
        docs_row.contains("<svg") && docs_row.contains("<rect"),
        "{docs_row}"
    );
    assert!(docs_row.contains("1/s (burst 1)"));
    row(&first, "data-client", "team-ci");
    // No cluster yet: the fleet section stays hidden.
    let fleet = first.find("<section id=\"fleet\"").expect("fleet section");
    let fleet_tag = &first[fleet..fleet + first[fleet..].find('>').expect("tag end")];
    assert!(fleet_tag.contains("hidden"), "{fleet_tag}");
    assert!(!first.contains("<tr data-replica"));
    // The page refreshed itself from /status at least once without reloading.
    let updated_at = first.find("id=\"updated\"").expect("updated stamp");
    assert!(data_number(&first[updated_at..], "refreshes") >= 1);

    // More traffic: the next look shows it.
    assert!(send(&h, CI_KEY, "/deploy/x", 7)
        .await
        .iter()
        .all(|&s| s == 200));
    status_until(&h, &admin, |s| route_total(s, "/deploy") == 19).await;
    let second = dump_dom(&url).await;
    assert_eq!(
        data_number(row(&second, "data-route", "/deploy"), "total"),
        19
    );

    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    chromium(
        url.clone(),
        vec![
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1600".into(),
            "--virtual-time-budget=4000".into(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(
        png.len() > 20_000,
        "a page, not a blank: {} bytes",
        png.len()
    );

    let html = h
        .http
        .get(&url)
        .header("accept", "text/html")
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("page text");
    for page in [&html, &first, &second] {
        for needle in [SECRET, DOCS_KEY, CI_KEY, token.as_str()] {
            assert!(!page.contains(needle), "a secret is on the status page");
        }
    }
}

/// Whether the fleet section says Redis is up (`Some(true)`), down, or is not there.
fn fleet_badge(dom: &str) -> Option<bool> {
    let start = dom.find("<section id=\"fleet\"")?;
    let section = &dom[start..start + dom[start..].find("</section>")?];
    let tag = &section[..section.find('>')?];
    if tag.contains("hidden") {
        return None;
    }
    match (section.contains("Redis up"), section.contains("Redis down")) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        _ => panic!("no Redis badge in {section}"),
    }
}

#[tokio::test]
async fn the_fleet_section_shows_redis_health_and_the_replicas() {
    use support::redis::{RedisOptions, RedisServer};
    if !chromium_available() {
        return;
    }
    const PASSWORD: &str = "redis-pw-MARKER-77aa";
    let options = RedisOptions {
        password: Some(PASSWORD.into()),
        ..RedisOptions::default()
    };
    let Some(mut redis) = RedisServer::start_with(options).await else {
        return;
    };
    let setup = Setup::default();
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    let mut text = support::config_text(&setup, &emulator);
    text.push_str(&format!(
        "\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         \n[cluster]\nredis_url = \"{}\"\nsync_interval = \"50ms\"\ntimeout = \"200ms\"\n",
        redis.url()
    ));
    let other = sitecore_auth_proxy::app::start(support::parse(&text), Default::default())
        .await
        .expect("second replica");
    let h = Harness::from_text(emulator, &text, fast_tuning()).await;
    h.wait_ready().await;
    let admin = format!("http://{}", h.proxy.admin_addr().expect("admin listener"));
    status_until(&h, &admin, |s| {
        s["cluster"]["replicas"].as_array().map(Vec::len) == Some(2)
    })
    .await;

    let url = format!("{admin}/status");
    let up = dump_dom(&url).await;
    assert_eq!(fleet_badge(&up), Some(true));
    assert_eq!(
        up.matches("<tr data-replica").count(),
        2,
        "two replicas listed"
    );
    let own = h
        .proxy
        .shared()
        .cluster
        .as_ref()
        .expect("clustered")
        .replica()
        .to_owned();
    assert!(up.contains(&own), "this replica is listed by name");
    assert!(
        !up.contains(PASSWORD),
        "the Redis password is on the status page"
    );

    redis.kill();
    status_until(&h, &admin, |s| s["cluster"]["up"] == false).await;
    let down = dump_dom(&url).await;
    assert_eq!(fleet_badge(&down), Some(false));
    // The last fleet seen stays listed while Redis is away.
    assert_eq!(down.matches("<tr data-replica").count(), 2);
    assert!(!down.contains(PASSWORD));
    drop(other);
}
