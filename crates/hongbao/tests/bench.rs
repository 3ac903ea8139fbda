//! `hongbao bench` over HTTP against the real server: the load generator's own client, its
//! counts and its audit, end to end. BENCHMARKS.md is made by this path; here it runs small
//! and briefly, and what it reports is checked against what the server holds.

mod support;

use std::process::Command;

use serde_json::Value;
use support::*;

/// Runs `hongbao bench SCENARIO` against `url` for a short while and returns its JSON result.
fn bench(url: &str, scenario: &str, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("result.json");
    let plot = dir.path().join("plot.svg");
    let run = Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["bench", scenario, "--url", url, "--duration-s", "2", "--concurrency", "8", "--quiet"])
        .args(args)
        .arg("--out")
        .arg(&out)
        .arg("--plot")
        .arg(&plot)
        .env("HONGBAO_API_KEY", API_KEY)
        .env("HONGBAO_ADMIN_KEY", ADMIN_KEY)
        .output()
        .expect("cannot run hongbao bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "hongbao bench {scenario} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    assert!(svg.starts_with("<svg"), "{scenario}: the plot is not an SVG");
    serde_json::from_slice(&std::fs::read(&out).expect("the result was written")).expect("the result is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_over_http_counts_every_claim_and_passes_the_audit() {
    // Arrange.
    let server = TestServer::start(Opts::sets(2)).await;
    let url = server.api().url("");

    // Act: a storm on one packet of 300 shares, its connections not warmed up, then a
    // festival of small packets, each connection answering one /healthz before the clock.
    let url2 = url.clone();
    let healthz_before = healthz_answered(&url).await;
    let storm =
        tokio::task::spawn_blocking(move || bench(&url2, "storm", &["--shares", "300", "--no-warm-up"]))
            .await
            .unwrap();
    let healthz_after_storm = healthz_answered(&url).await;
    let url2 = url.clone();
    let festival = tokio::task::spawn_blocking(move || {
        bench(&url2, "festival", &["--shares", "20", "--packets", "10", "--sets", "2"])
    })
    .await
    .unwrap();
    let healthz_after_festival = healthz_answered(&url).await;

    // Assert: the storm paid every share exactly once, to the fen, and turned the rest away.
    let c = &storm["claims"];
    assert_eq!(storm["audit_ok"], Value::Bool(true), "storm: {storm}");
    assert_eq!(c["errors"], 0, "storm: {storm}");
    assert_eq!(c["paid"], 300, "storm: every share is paid once");
    assert!(c["turned_away"].as_u64().unwrap() > 0, "storm: the crowd outlasts the packet");
    assert_eq!(storm["storm"]["paid_fen_matches_total"], Value::Bool(true), "storm: {storm}");
    assert_eq!(
        storm["requests"].as_u64().unwrap(),
        c["paid"].as_u64().unwrap() + c["turned_away"].as_u64().unwrap() + c["overloaded"].as_u64().unwrap(),
        "storm: every request is counted once"
    );
    // The festival re-sends what empties, and its history queries are answered.
    let c = &festival["claims"];
    assert_eq!(festival["audit_ok"], Value::Bool(true), "festival: {festival}");
    assert_eq!(c["errors"], 0, "festival: {festival}");
    // More than the 10 packets and their 10 spares hold: re-sent packets were claimed too.
    assert!(
        c["paid"].as_u64().unwrap() > 2 * 10 * 20,
        "festival: packets were emptied and sent again: {festival}"
    );
    assert!(c["paid_fen"].as_i64().unwrap() > 0);
    for op in ["send", "history"] {
        let o = &festival["ops"][op];
        assert!(o["ok"].as_u64().is_some_and(|n| n > 0), "festival: no {op} answered: {festival}");
        assert_eq!(o["errors"], 0, "festival: {op}: {festival}");
    }
    // Each claim's answer said how long the server took (Server-Timing), and that time is
    // part of what the bench waited: the server's share of each percentile is at most the whole.
    for (name, run) in [("storm", &storm), ("festival", &festival)] {
        let (whole, server) = (&run["claims"]["latency"], &run["claims"]["server_latency"]);
        assert_eq!(server["count"], whole["count"], "{name}: every claim was timed by the server: {run}");
        for q in ["latency_us_p50", "latency_us_p99", "latency_us_max"] {
            let (w, s) = (whole[q].as_u64().unwrap(), server[q].as_u64().unwrap());
            // Both histograms keep 3 significant figures: equal values may differ by 0.1 %.
            assert!(s <= w + w / 1000 + 1, "{name}: server {q} {s} µs above the bench's {w} µs: {run}");
        }
    }
    // The server said what its CPU went to (`/metrics`), and the bench divided it by the
    // requests: the HTTP workers did work for every run, and `all` is the sum of the kinds.
    for (name, run) in [("storm", &storm), ("festival", &festival)] {
        let per = run["server_cpu_us_per_request"].as_object().unwrap_or_else(|| panic!("{name}: {run}"));
        for kind in ["tokio", "query", "set", "fold", "checkpoint", "other", "all"] {
            assert!(per.get(kind).and_then(Value::as_f64).is_some_and(|v| v >= 0.0), "{name}: {kind}: {run}");
        }
        assert!(per["tokio"].as_f64().unwrap() > 0.0, "{name}: the workers used no CPU: {run}");
        let parts: f64 = per.iter().filter(|(k, _)| *k != "all").map(|(_, v)| v.as_f64().unwrap()).sum();
        let all = per["all"].as_f64().unwrap();
        // Each figure is rounded to 0.01 µs on its own.
        assert!(
            (parts - all).abs() <= 0.01 * per.len() as f64,
            "{name}: parts {parts} against all {all}: {run}"
        );
        // The same read at the load's end, before the audit: a part of it, kind by kind.
        let during = run["server_cpu_us_per_request_during_load"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: no CPU during the load: {run}"));
        assert!(
            during["tokio"].as_f64().unwrap() > 0.0,
            "{name}: the workers used no CPU during the load: {run}"
        );
        for (kind, v) in during {
            let (v, whole) = (v.as_f64().unwrap(), per.get(kind).and_then(Value::as_f64).unwrap_or(0.0));
            assert!(
                v <= whole + 0.01,
                "{name}: {kind} {v} during the load, above {whole} to the audit: {run}"
            );
        }
    }

    // Warming up: the festival's 8 claiming and 8 asking connections (and its senders') each
    // asked once before the clock; the storm's did not.
    assert_eq!(storm["config"]["warmed_up"], Value::Bool(false), "storm: {storm}");
    assert_eq!(festival["config"]["warmed_up"], Value::Bool(true), "festival: {festival}");
    let (storm_asked, festival_asked) =
        (healthz_after_storm - healthz_before, healthz_after_festival - healthz_after_storm);
    assert!(storm_asked < 8, "storm: {storm_asked} /healthz answered without a warm-up");
    assert!(festival_asked >= 16, "festival: {festival_asked} /healthz answered, fewer than its connections");

    // The server's own audit, asked here and not by the bench, agrees: no fen lost.
    assert_audit_ok(&server.audit().await);
}

/// The `/healthz` requests the server at `url` has answered with 200, from its `/metrics`.
async fn healthz_answered(url: &str) -> u64 {
    let text =
        reqwest::get(format!("{url}/metrics")).await.expect("GET /metrics").text().await.expect("a body");
    text.lines()
        .filter(|l| {
            l.starts_with("http_requests_total{")
                && l.contains("route=\"/healthz\"")
                && l.contains("status=\"200\"")
        })
        .map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).expect("a counter's value") as u64)
        .sum()
}
