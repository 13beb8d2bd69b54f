//! Time the server adds to a job on top of the executor's own job time.
//!
//! A job's events stream writes small events one after another; with Nagle's algorithm on the
//! accepted socket each waited for the client's delayed ACK of the previous one, which added
//! 20-40 ms to every job (twice the tiny model's whole job time) for clients such as Python's
//! http.client (benches/bench_server.py shows it). This client's ACK timing does not trigger
//! that delay, so this test guards the overhead in general rather than reproducing it.

mod common;

use common::*;
use serde_json::json;
use std::time::Instant;

fn job_seconds_sum(ts: &TestServer) -> f64 {
    let text = String::from_utf8(get(&ts.url("/metrics")).bytes).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("lcm_job_duration_seconds_sum "))
        .expect("job duration in /metrics")
        .parse()
        .unwrap()
}

#[test]
fn events_stream_adds_no_nagle_delay() {
    let ts = TestServer::start(tiny_lcm_only());
    let body = json!({"prompt": "a red fox", "num_inference_steps": 4, "seed": 0, "width": 32, "height": 32});
    let mut overheads = Vec::new();
    for _ in 0..7 {
        let before = job_seconds_sum(&ts);
        let t0 = Instant::now();
        let r = post_json(&ts.url("/api/v1/jobs"), &body);
        assert_eq!(r.status, 202);
        let id = r.json()["id"].as_str().unwrap().to_string();
        let events = sse(&ts.url(&format!("/api/v1/jobs/{id}/events")));
        let wall = t0.elapsed().as_secs_f64();
        assert_eq!(events.last().unwrap().0, "succeeded");
        overheads.push(wall - (job_seconds_sum(&ts) - before));
    }
    overheads.sort_by(f64::total_cmp);
    let median = overheads[overheads.len() / 2];
    assert!(median < 0.015, "median overhead {:.1} ms per job: {overheads:?}", median * 1e3);
}

fn tiny_lcm_only() -> lcm_server::config::ServerConfig {
    lcm_server::config::ServerConfig { models: vec![source("models/tiny-lcm")], ..Default::default() }
}
