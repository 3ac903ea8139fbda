//! Prometheus metrics: request rates and latencies by route and status, and the engine's own
//! figures (queue depths here; batch sizes and commit times recorded by the sets).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::AppState;

/// The process-wide recorder, installed once however many routers are built (tests build many).
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
        })
        .clone()
}

pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    let labels = [("route", route), ("method", method), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    res
}

pub async fn render(State(s): State<AppState>) -> impl IntoResponse {
    for set in s.engine.status() {
        let label = [("set", set.set.to_string())];
        metrics::gauge!("hongbao_set_queue_depth", &label).set(set.queue_depth as f64);
        metrics::gauge!("hongbao_set_ready", &label).set(if set.ready { 1.0 } else { 0.0 });
        if let Some(n) = set.unapplied_commits {
            metrics::gauge!("hongbao_store_unapplied_commits", &label).set(n as f64);
        }
    }
    ([("content-type", "text/plain; version=0.0.4")], s.metrics.render())
}
