//! `demo` works as a new user would try it: the printed commands succeed against the proxy.

use sitecore_auth_proxy::demo;

#[tokio::test]
async fn demo_routes_answer_like_the_printed_curl_commands() {
    let demo = demo::start("127.0.0.1:0".parse().expect("addr"))
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
