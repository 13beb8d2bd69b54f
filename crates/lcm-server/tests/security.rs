//! API keys, CORS, the refusal of an open host without a key, 503 while stopping.
mod common;

use base64::Engine as _;
use common::*;
use serde_json::json;

#[test]
fn api_keys_bearer_and_basic() {
    let mut c = config();
    c.api_keys = vec!["s3cret".into()];
    let ts = TestServer::start(c);
    // /health stays open.
    assert_eq!(get(&ts.url("/health")).status, 200);
    let basic = |user_pass: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_pass));
    for (path, field) in [("/api/v1/models", "error"), ("/sdapi/v1/sd-models", "detail"), ("/v1/models", "error")] {
        let missing = get(&ts.url(path));
        assert_eq!(missing.status, 401, "{path}");
        assert!(missing.json().get(field).is_some(), "{path}");
        assert_eq!(get_auth(&ts.url(path), "Bearer wrong").status, 401);
        assert_eq!(get_auth(&ts.url(path), "Bearer s3cre").status, 401);
        assert_eq!(get_auth(&ts.url(path), &basic("user:wrong")).status, 401);
        assert_eq!(get_auth(&ts.url(path), "Bearer s3cret").status, 200, "{path}");
        // A1111's --api-auth user:pass, the key as the password.
        assert_eq!(get_auth(&ts.url(path), &basic("user:s3cret")).status, 200, "{path}");
    }
    let e = get(&ts.url("/v1/models")).json();
    assert_eq!(e["error"]["code"], "invalid_api_key");
    // A POST without a key is refused before its body is looked at.
    assert_eq!(post_json(&ts.url("/v1/images/generations"), &json!({"prompt": "x"})).status, 401);
}

#[test]
fn an_open_host_needs_a_key() {
    let mut c = config();
    c.host = "0.0.0.0".into();
    let err = c.check().unwrap_err().to_string();
    assert!(err.contains("--api-key"), "{err}");
    c.api_keys = vec!["k".into()];
    assert!(c.check().is_ok());
    c.api_keys.clear();
    c.insecure_no_auth = true;
    assert!(c.check().is_ok());
    for host in ["127.0.0.1", "localhost", "::1", "[::1]"] {
        assert!(lcm_server::config::is_loopback(host), "{host}");
    }
    assert!(!lcm_server::config::is_loopback("192.168.1.2"));
}

#[test]
fn cors_only_for_listed_origins() {
    let mut c = config();
    c.cors_origins = vec!["http://app.example".into()];
    let ts = TestServer::start(c);
    let allowed = agent().get(&ts.url("/api/v1/models")).set("Origin", "http://app.example").call().unwrap();
    assert_eq!(allowed.header("access-control-allow-origin"), Some("http://app.example"));
    let other = agent().get(&ts.url("/api/v1/models")).set("Origin", "http://evil.example").call().unwrap();
    assert_eq!(other.header("access-control-allow-origin"), None);
    let preflight = agent()
        .request("OPTIONS", &ts.url("/v1/images/generations"))
        .set("Origin", "http://app.example")
        .set("Access-Control-Request-Method", "POST")
        .call()
        .unwrap();
    assert_eq!(preflight.header("access-control-allow-origin"), Some("http://app.example"));
    // Without --cors-origin, no CORS headers at all.
    let plain = TestServer::start(config());
    let r = agent().get(&plain.url("/api/v1/models")).set("Origin", "http://app.example").call().unwrap();
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[test]
fn stopping_answers_503() {
    let ts = TestServer::start(config());
    ts.server.begin_shutdown();
    let r = post_json(&ts.url("/v1/images/generations"), &json!({"prompt": "x"}));
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("shutting down"));
    assert_eq!(get(&ts.url("/health")).json()["status"], "stopping");
}
