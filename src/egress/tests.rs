use super::*;

fn no_proxy(list: &str) -> NoProxy {
    NoProxy::parse(list)
}

#[test]
fn a_domain_matches_itself_and_its_subdomains_in_any_case() {
    let np = no_proxy("sitecorecloud.io, .internal.example");
    for host in [
        "sitecorecloud.io",
        "auth.sitecorecloud.io",
        "A.B.SiteCoreCloud.IO",
        "x.internal.example",
        "internal.example",
    ] {
        assert!(np.bypasses(host, 443), "{host}");
    }
    for host in [
        "notsitecorecloud.io",
        "sitecorecloud.io.evil.com",
        "example",
    ] {
        assert!(!np.bypasses(host, 443), "{host}");
    }
}

#[test]
fn star_bypasses_everything_and_an_empty_list_nothing() {
    assert!(no_proxy("*").bypasses("anything.example", 1));
    assert!(!no_proxy("").bypasses("localhost", 80));
    assert!(no_proxy("").is_empty());
}

#[test]
fn loopback_is_not_bypassed_unless_listed() {
    assert!(!no_proxy("example.com").bypasses("127.0.0.1", 80));
    assert!(!no_proxy("example.com").bypasses("localhost", 80));
    assert!(no_proxy("localhost,127.0.0.1").bypasses("localhost", 80));
    assert!(no_proxy("localhost,127.0.0.1").bypasses("127.0.0.1", 80));
}

#[test]
fn addresses_and_cidr_ranges() {
    let np = no_proxy("10.0.0.0/8, 192.168.1.7, ::1, [fd00::]/8, 2001:db8::/32");
    assert!(np.bypasses("10.20.30.40", 443));
    assert!(np.bypasses("192.168.1.7", 443));
    assert!(!np.bypasses("192.168.1.8", 443));
    assert!(np.bypasses("::1", 443));
    assert!(np.bypasses("[::1]", 443));
    assert!(np.bypasses("2001:db8::5", 443));
    assert!(!np.bypasses("2001:db9::5", 443));
    assert!(!np.bypasses("11.0.0.1", 443));
}

#[test]
fn a_port_narrows_an_entry() {
    let np = no_proxy("internal.example:8443, 127.0.0.1:9000, [::1]:9001");
    assert!(np.bypasses("api.internal.example", 8443));
    assert!(!np.bypasses("api.internal.example", 443));
    assert!(np.bypasses("127.0.0.1", 9000));
    assert!(!np.bypasses("127.0.0.1", 9001));
    assert!(np.bypasses("::1", 9001));
}

#[test]
fn the_proxy_url_is_parsed_and_never_shows_its_password() {
    let proxy = ProxyEndpoint::parse("http://us%3Aer:p%40ss@proxy.corp:3128").expect("valid");
    assert_eq!(proxy.authority(), "proxy.corp:3128");
    assert_eq!(proxy.to_string(), "http://proxy.corp:3128");
    assert!(!format!("{proxy:?}").contains("p@ss"));
    let (user, password) = proxy.credentials.as_ref().expect("credentials");
    assert_eq!((user.as_str(), password.expose()), ("us:er", "p@ss"));
    let header = proxy.authorization().expect("basic");
    assert!(header.is_sensitive());
    assert_eq!(header, "Basic dXM6ZXI6cEBzcw==");
    assert_eq!(
        ProxyEndpoint::parse("http://[::1]:8080")
            .expect("v6")
            .authority(),
        "[::1]:8080"
    );
    assert_eq!(
        ProxyEndpoint::parse("http://proxy").expect("no port").port,
        80
    );
}

#[test]
fn proxy_urls_that_cannot_work_are_refused_without_echoing_a_password() {
    for bad in [
        "https://proxy:3128",
        "socks5://proxy:1080",
        "proxy:3128",
        "http://proxy:3128/path",
        "http://u:hunter2@",
    ] {
        let error = ProxyEndpoint::parse(bad).expect_err(bad);
        assert!(!error.contains("hunter2"), "{error}");
    }
}

#[test]
fn the_rule_picks_the_proxy_by_scheme_and_honours_no_proxy() {
    let proxy = ProxyEndpoint::parse("http://proxy.corp:3128").expect("valid");
    let egress = Egress {
        https: Some(proxy.clone()),
        http: None,
        no_proxy: no_proxy(".internal"),
        source: "HTTPS_PROXY".into(),
    };
    assert_eq!(
        egress.proxy_for("https", "auth.sitecorecloud.io", 443),
        Some(&proxy)
    );
    assert_eq!(egress.proxy_for("http", "auth.sitecorecloud.io", 80), None);
    assert_eq!(egress.proxy_for("https", "api.internal", 443), None);
    let url = reqwest::Url::parse("https://auth.sitecorecloud.io/oauth/token").expect("url");
    assert_eq!(
        egress.describe(&url),
        "via http://proxy.corp:3128 (HTTPS_PROXY)"
    );
}
