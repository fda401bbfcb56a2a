//! `deploy/prometheus/` and `deploy/grafana/` agree with the proxy: every alert rule is complete
//! (alert, expr, for, severity, summary) and has a firing case in `rules.test.yaml`, the
//! dashboard parses and every panel has a query, and every metric an expression reads is one a
//! running proxy exports on `/metrics`. `promtool` checks and unit-tests the rules when it is
//! installed (`.ci/run` installs it); without it the test fails when `CI` is set, and otherwise
//! skips with a note.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

use super::support::{Harness, Setup};
use super::{repo, seq, str_at};

/// What the dashboard must show (the families an operator looks at first).
const DASHBOARD_MUST_SHOW: [&str; 9] = [
    "proxy_requests_total",
    "proxy_request_duration_seconds_bucket",
    "proxy_rejected_total",
    "token_expiry_seconds",
    "credential_up",
    "token_requests_total",
    "proxy_inflight_requests",
    "proxy_open_connections",
    "config_reloads_total",
];

fn prometheus_dir() -> PathBuf {
    repo().join("deploy").join("prometheus")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every rule of rules.yaml, across its groups.
fn rules() -> Vec<Value> {
    let file = yaml(&prometheus_dir().join("rules.yaml"));
    let groups = seq(&file, "groups");
    assert!(!groups.is_empty(), "rules.yaml has no groups");
    groups
        .iter()
        .flat_map(|g| seq(g, "rules").to_vec())
        .collect()
}

fn dashboard() -> serde_json::Value {
    let path = repo()
        .join("deploy")
        .join("grafana")
        .join("sitecore-auth-proxy.json");
    let text = std::fs::read_to_string(&path).expect("the Grafana dashboard");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric names a PromQL expression reads: its identifiers that are not functions,
/// aggregations, keywords, label names (inside `{...}` or the lists of `by`, `without`, `on`,
/// `ignoring`, `group_left`, `group_right`) or inside strings and range selectors.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
    ];
    const LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 7] = ["and", "or", "unless", "bool", "offset", "inf", "nan"];

    // Strings, label matchers and range selectors become spaces.
    let mut plain = String::new();
    let (mut braces, mut brackets, mut quote, mut escaped) = (0, 0, None, false);
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            plain.push(' ');
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            _ if braces == 0 && brackets == 0 => {
                plain.push(c);
                continue;
            }
            _ => {}
        }
        plain.push(' ');
    }

    let chars: Vec<char> = plain.chars().collect();
    let next_non_space = |from: usize| chars[from..].iter().copied().find(|c| !c.is_whitespace());
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || c == '.' {
            // A number (0.05, 1e3): not a name.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == '_' || c == ':') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len()
            && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
        {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if LISTS.contains(&word.as_str()) {
            // Skip its parenthesised list of label names.
            if next_non_space(i) == Some('(') {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
            }
        } else if AGGREGATIONS.contains(&word.as_str())
            || KEYWORDS.contains(&word.as_str())
            || next_non_space(i) == Some('(')
        {
            // An aggregation, a keyword or a function call.
        } else {
            names.insert(word);
        }
    }
    names
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let names = |e: &str| promql_metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route=~"$r"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("min by (job, credential) (b) < 300 unless on (job) sum without (x) (increase(c{o=\"ok\"}[15m])) > 0"),
        ["b", "c"]
    );
    assert_eq!(
        names(r#"d == 0 and e{s=~"5..", t="a}b"} / 1e3"#),
        ["d", "e"]
    );
}

/// The metric names of a running proxy's `/metrics`, after enough traffic that every family
/// has a series (a refusal for `proxy_rejected_total`). With a `[cluster]` whose Redis does not
/// answer (port 1), so the fleet's families are there too.
async fn exported_metric_names() -> BTreeSet<String> {
    let h = Harness::with(Setup {
        extra_toml: "\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                     \n[[clients]]\nname = \"team\"\nkey = \"ck-observability-1\"\nrate = \"1/s\"\nburst = 1\n\
                     \n[cluster]\nredis_url = \"redis://127.0.0.1:1/0\"\n"
            .into(),
        ..Setup::default()
    })
    .await;
    h.wait_ready().await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let response = h
            .http
            .get(h.url("/deploy/x"))
            .header("x-api-key", "ck-observability-1")
            .send()
            .await
            .expect("response");
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 429]);
    let admin = h.proxy.admin_addr().expect("admin listener");
    let text = h
        .http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            l.split(['{', ' '])
                .next()
                .expect("a sample name")
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn alert_rules_are_complete_and_read_only_exported_metrics() {
    let exported = exported_metric_names().await;
    assert!(exported.contains("proxy_rejected_total"), "{exported:?}");
    let tests = yaml(&prometheus_dir().join("rules.test.yaml"));
    let tested: BTreeSet<&str> = seq(&tests, "tests")
        .iter()
        .flat_map(|t| seq(t, "alert_rule_test"))
        .filter(|case| !seq(case, "exp_alerts").is_empty())
        .filter_map(|case| str_at(case, "alertname"))
        .collect();

    let rules = rules();
    assert!(rules.len() >= 6, "rules.yaml has {} rules", rules.len());
    let mut alerts = BTreeSet::new();
    for rule in &rules {
        let alert = str_at(rule, "alert").expect("every rule is an alert with a name");
        assert!(alerts.insert(alert), "{alert} is defined twice");
        let expr = str_at(rule, "expr").unwrap_or_else(|| panic!("{alert}: no expr"));
        let wait = str_at(rule, "for").unwrap_or_else(|| panic!("{alert}: no for"));
        assert!(
            wait.ends_with(['s', 'm', 'h']) && wait[..wait.len() - 1].parse::<u32>().is_ok(),
            "{alert}: for = {wait:?} is not a duration"
        );
        let severity =
            str_at(rule, "labels.severity").unwrap_or_else(|| panic!("{alert}: no severity"));
        assert!(
            matches!(severity, "critical" | "warning"),
            "{alert}: severity {severity}"
        );
        let summary = str_at(rule, "annotations.summary").unwrap_or_default();
        assert!(
            !summary.trim().is_empty(),
            "{alert}: no annotations.summary"
        );
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "{alert}: reads no metric: {expr}");
        for name in names {
            assert!(
                exported.contains(&name),
                "{alert} reads {name}, which the proxy does not export"
            );
        }
        assert!(
            tested.contains(alert),
            "{alert} has no firing case in rules.test.yaml"
        );
    }
    for required in [
        "SitecoreProxyTokenExpiringWithoutRefresh",
        "SitecoreProxyTokenRefreshFailing",
        "SitecoreProxyCredentialDown",
        "SitecoreProxyHigh5xxRate",
        "SitecoreProxyRateLimitRefusals",
        "SitecoreProxyClusterDown",
    ] {
        assert!(alerts.contains(required), "no {required} rule");
    }
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut all = Vec::new();
    let mut stack: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        all.push(panel);
    }
    all
}

#[tokio::test]
async fn the_dashboard_parses_and_reads_only_exported_metrics() {
    let exported = exported_metric_names().await;
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "sitecore-auth-proxy");
    let mut ids = BTreeSet::new();
    let mut shown = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "{title}: id reused"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            let names = promql_metric_names(expr);
            assert!(!names.is_empty(), "{title}: reads no metric: {expr}");
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{title} reads {name}, which the proxy does not export"
                );
                shown.insert(name);
            }
        }
    }
    for name in DASHBOARD_MUST_SHOW {
        assert!(shown.contains(name), "no panel shows {name}");
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(definition) = variable["definition"].as_str() {
            let inner = definition
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
                .unwrap_or_else(|| panic!("unexpected variable query {definition}"));
            let metric = inner.split(',').next().expect("metric").trim();
            assert!(exported.contains(metric), "variable reads {metric}");
        }
    }
}

fn promtool() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| Some(PathBuf::from("/usr/bin/promtool")).filter(|p| p.is_file()))
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let Some(promtool) = promtool() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing and CI is set: .ci/run installs it (apt-get install prometheus)"
        );
        eprintln!("note: promtool is not installed; the promtool rule checks are skipped");
        return;
    };
    for args in [
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "rules.test.yaml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(prometheus_dir())
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
