//! `demo` works as a new user would try it: the printed commands succeed against the proxy, and
//! the printed status page and metrics URLs answer on the admin listener.

use sitecore_auth_proxy::demo;

#[tokio::test]
async fn demo_routes_answer_like_the_printed_curl_commands() {
    let demo = demo::start("127.0.0.1:0".parse().expect("addr"), demo::DEFAULT_ADMIN)
        .await
        .expect("demo starts");
    let base = format!("http://{}", demo.proxy.local_addr());
    let http = reqwest::Client::new();

    let commands = demo.curl_commands();
    assert!(commands
        .iter()
        .any(|c| c.contains("/authoring") && c.contains("-d")));
    assert!(commands
        .iter()
        .any(|c| c.contains("/deploy/api/projects/v1")));

    let response = http
        .post(format!("{base}/authoring"))
        .header("content-type", "application/json")
        .body(r#"{"query":"{ sites { name } }"}"#)
        .send()
        .await
        .expect("graphql");
    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = response.json().await.expect("json");
    assert_eq!(echo["api"], "authoring");

    for (prefix, _) in demo::ROUTES {
        let response = http
            .get(format!("{base}{prefix}/x"))
            .send()
            .await
            .expect("get");
        assert_eq!(response.status(), 200, "{prefix}");
    }
    assert_eq!(demo.emulator.token_requests(), 1);
}

#[tokio::test]
async fn demo_serves_the_status_page_and_metrics_it_prints() {
    let demo = demo::start("127.0.0.1:0".parse().expect("addr"), demo::DEFAULT_ADMIN)
        .await
        .expect("demo starts");
    let admin = demo
        .proxy
        .admin_addr()
        .expect("the demo has an admin listener");
    assert!(admin.ip().is_loopback());
    assert_ne!(admin.port(), 0);
    assert_eq!(demo.status_page_url(), format!("http://{admin}/status"));
    assert_eq!(demo.metrics_url(), format!("http://{admin}/metrics"));
    let http = reqwest::Client::new();
    let response = http
        .get(format!("http://{}/deploy/x", demo.proxy.local_addr()))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 200);

    let page = http
        .get(demo.status_page_url())
        .header("accept", "text/html")
        .send()
        .await
        .expect("status page");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .expect("content type")
        .starts_with("text/html"));
    assert!(page.text().await.expect("page").contains("/stream/skills"));

    let status: serde_json::Value = http
        .get(demo.status_page_url())
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON");
    let routes = status["routes"].as_array().expect("routes");
    assert_eq!(routes.len(), demo::ROUTES.len());
    assert_eq!(status["credentials"][0]["name"], "automation");

    let metrics = http
        .get(demo.metrics_url())
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains(r#"proxy_requests_total{route="/deploy",client="-",status="200"} 1"#),
        "{metrics}"
    );
}
