//! The HTTP client: one keep-alive HTTP/1.1 connection per task, driven through hyper's
//! connection-level API (no pool, no per-request lookup, no redirect or cookie machinery).
//!
//! Per request it allocates only what hyper's request and response types need: the header
//! values are built once and shared, claim paths are cached per packet (one cache per load
//! thread, shared by its connections), request bodies are formatted into a reused buffer and
//! responses are read into another. It never parses a claim's JSON: the status says what
//! happened and the amount is scanned from the bytes.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use crate::client::Answer;

/// Longest wait for one answer: past it the request is an error and its connection is
/// dropped (an HTTP/1.1 connection with a request stuck on it cannot carry another).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed connect, so a dead server is not hammered in a hot loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);
/// Claim paths cached per load thread: a festival's hot packets stay cached, and the cache
/// is dropped whole when it reaches this size.
const CLAIM_PATHS_CACHED_MAX: usize = 4096;
/// The first bytes of an unexpected answer kept in an error message.
const ERROR_BODY_CHARS_MAX: usize = 200;

thread_local! {
    /// The claim paths of the packets this load thread's connections claimed from. One cache
    /// per connection grew one table per connection, in fresh pages: 4 % of the festival's
    /// client CPU went to the kernel zeroing them.
    static CLAIM_PATHS: RefCell<HashMap<u64, Uri>> = RefCell::new(HashMap::new());
}

/// The path that claims a share of `packet`, from this thread's cache.
fn claim_path(packet: u64) -> Uri {
    CLAIM_PATHS.with_borrow_mut(|paths| {
        if paths.len() >= CLAIM_PATHS_CACHED_MAX && !paths.contains_key(&packet) {
            paths.clear();
        }
        paths
            .entry(packet)
            .or_insert_with(|| {
                Uri::from_maybe_shared(Bytes::from(format!("/v1/packets/{packet}/claim")))
                    .expect("valid path")
            })
            .clone()
    })
}

/// Where the server is and the keys to show it. Built once, shared by every connection.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    host: HeaderValue,
    service: HeaderValue,
    admin: HeaderValue,
    json: HeaderValue,
}

impl Endpoint {
    /// `url` is `http://HOST:PORT` (a trailing slash or path is ignored).
    pub async fn new(url: &str, api_key: &str, admin_key: &str) -> anyhow::Result<Arc<Endpoint>> {
        let uri: Uri = url.parse().with_context(|| format!("bad --url {url}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--url must start with http:// (the bench speaks plain HTTP/1.1)");
        }
        let authority = uri.authority().ok_or_else(|| anyhow!("--url {url} has no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await
            .with_context(|| format!("cannot resolve {}", authority.host()))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to no address", authority.host()))?;
        let bearer = |key: &str| {
            HeaderValue::from_str(&format!("Bearer {key}")).context("a key must be printable ASCII")
        };
        Ok(Arc::new(Endpoint {
            addr,
            host: HeaderValue::from_str(authority.as_str()).context("bad host in --url")?,
            service: bearer(api_key)?,
            admin: bearer(admin_key)?,
            json: HeaderValue::from_static("application/json"),
        }))
    }
}

#[derive(Debug, Clone, Copy)]
enum Key {
    None,
    Service,
    Admin,
}

/// One connection and the buffers it reuses. Owned by one task.
pub struct HttpClient {
    endpoint: Arc<Endpoint>,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// The last answer's body.
    body: Vec<u8>,
    /// Where request bodies are formatted.
    scratch: String,
    /// The server's own time for the last answer (`Server-Timing: app;dur=`), if it said.
    server_time: Option<Duration>,
}

impl HttpClient {
    pub async fn connect(endpoint: Arc<Endpoint>) -> anyhow::Result<HttpClient> {
        let mut c = HttpClient {
            endpoint,
            sender: None,
            body: Vec::with_capacity(512),
            scratch: String::with_capacity(256),
            server_time: None,
        };
        c.reconnect().await.map_err(|e| anyhow!(e))?;
        Ok(c)
    }

    async fn reconnect(&mut self) -> Result<(), String> {
        self.sender = None;
        let stream = tokio::net::TcpStream::connect(self.endpoint.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.endpoint.addr))?;
        // Requests are small and answered one at a time: Nagle would only add delay.
        stream.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let (sender, conn) =
            http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            // The connection ends when the server closes it or the sender is dropped.
            let _ = conn.await;
        });
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends one request and reads the whole answer into `self.body`.
    async fn call(&mut self, method: Method, uri: Uri, key: Key, body: Bytes) -> Result<StatusCode, String> {
        if self.sender.is_none() {
            if let Err(e) = self.reconnect().await {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                return Err(e);
            }
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(HOST, self.endpoint.host.clone());
        match key {
            Key::None => {}
            Key::Service => {
                headers.insert(AUTHORIZATION, self.endpoint.service.clone());
            }
            Key::Admin => {
                headers.insert(AUTHORIZATION, self.endpoint.admin.clone());
            }
        }
        headers.insert(CONTENT_TYPE, self.endpoint.json.clone());
        let sender = self.sender.as_mut().expect("connected above");
        self.server_time = None;
        let exchange = async {
            sender.ready().await.map_err(|e| format!("connection: {e}"))?;
            let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
            let status = resp.status();
            self.server_time = resp.headers().get("server-timing").and_then(server_timing);
            let mut body = resp.into_body();
            self.body.clear();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("reading the answer: {e}"))?;
                if let Some(data) = frame.data_ref() {
                    self.body.extend_from_slice(data);
                }
            }
            Ok::<StatusCode, String>(status)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                Err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))
            }
        }
    }

    /// What the server said its last answer took (`Server-Timing`); `None` if it did not say,
    /// or the request got no answer.
    pub fn server_time(&self) -> Option<Duration> {
        self.server_time
    }

    fn unexpected(&self, what: &str, status: StatusCode) -> Answer {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = body.chars().take(ERROR_BODY_CHARS_MAX).collect();
        Answer::Error(format!("{what}: {status} {body}"))
    }

    /// `POST /v1/packets/{id}/claim {user}`.
    pub async fn claim(&mut self, packet: u64, user: &str) -> Answer {
        let uri = claim_path(packet);
        self.scratch.clear();
        let _ = write!(self.scratch, r#"{{"user":"{user}"}}"#);
        let body = Bytes::copy_from_slice(self.scratch.as_bytes());
        match self.call(Method::POST, uri, Key::Service, body).await {
            Ok(StatusCode::OK) => match scan_amount(&self.body) {
                Some(fen) => Answer::Paid(fen),
                None => self.unexpected("claim answered 200 without an amount", StatusCode::OK),
            },
            Ok(StatusCode::GONE) => Answer::Away,
            Ok(StatusCode::SERVICE_UNAVAILABLE) => Answer::Overloaded,
            Ok(status) => self.unexpected("claim", status),
            Err(e) => Answer::Error(e),
        }
    }

    /// `GET /healthz`.
    pub async fn healthz(&mut self) -> Answer {
        match self.call(Method::GET, Uri::from_static("/healthz"), Key::None, Bytes::new()).await {
            Ok(StatusCode::OK) => Answer::Done,
            Ok(StatusCode::SERVICE_UNAVAILABLE) => Answer::Overloaded,
            Ok(status) => self.unexpected("healthz", status),
            Err(e) => Answer::Error(e),
        }
    }

    /// A page of what a user received, or of what they sent.
    pub async fn history(&mut self, user: &str, sent: bool) -> Answer {
        let what = if sent { "sent" } else { "received" };
        let Ok(uri) = Uri::try_from(format!("/v1/users/{user}/{what}?limit=20")) else {
            return Answer::Error(format!("bad user id {user}"));
        };
        match self.call(Method::GET, uri, Key::Service, Bytes::new()).await {
            Ok(StatusCode::OK) => Answer::Done,
            Ok(StatusCode::SERVICE_UNAVAILABLE) => Answer::Overloaded,
            Ok(status) => self.unexpected(what, status),
            Err(e) => Answer::Error(e),
        }
    }

    /// `POST /v1/wallets/{user}/deposit` with the admin key.
    pub async fn deposit(&mut self, user: &str, amount_fen: i64, request_id: &str) -> Answer {
        let Ok(uri) = Uri::try_from(format!("/v1/wallets/{user}/deposit")) else {
            return Answer::Error(format!("bad user id {user}"));
        };
        let body = serde_json::json!({ "amount": amount_fen, "request_id": request_id }).to_string();
        match self.call(Method::POST, uri, Key::Admin, Bytes::from(body)).await {
            Ok(StatusCode::OK) => Answer::Done,
            Ok(StatusCode::SERVICE_UNAVAILABLE) => Answer::Overloaded,
            Ok(status) => self.unexpected("deposit", status),
            Err(e) => Answer::Error(e),
        }
    }

    /// `POST /v1/packets`: a lucky packet for anyone. The answer carries the new id.
    pub async fn send(
        &mut self,
        sender: &str,
        total_fen: i64,
        count: u32,
        expires_in_s: i64,
        request_id: &str,
    ) -> (Answer, Option<u64>) {
        let body = serde_json::json!({
            "sender": sender, "kind": "lucky", "total_amount": total_fen, "count": count,
            "audience": { "anyone": true }, "expires_in_s": expires_in_s, "request_id": request_id,
        })
        .to_string();
        match self.call(Method::POST, Uri::from_static("/v1/packets"), Key::Service, Bytes::from(body)).await
        {
            Ok(StatusCode::CREATED | StatusCode::OK) => {
                let id = serde_json::from_slice::<serde_json::Value>(&self.body)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|id| id.as_str()).and_then(|s| s.parse::<u64>().ok()));
                match id {
                    Some(id) => (Answer::Done, Some(id)),
                    None => (self.unexpected("send answered without an id", StatusCode::CREATED), None),
                }
            }
            Ok(StatusCode::SERVICE_UNAVAILABLE) => (Answer::Overloaded, None),
            Ok(status) => (self.unexpected("send", status), None),
            Err(e) => (Answer::Error(e), None),
        }
    }

    /// `GET /metrics`: the server's CPU seconds by what its threads do ([`cpu_seconds`]).
    pub async fn cpu_seconds(&mut self) -> anyhow::Result<Option<BTreeMap<String, f64>>> {
        let status = self
            .call(Method::GET, Uri::from_static("/metrics"), Key::None, Bytes::new())
            .await
            .map_err(|e| anyhow!("metrics: {e}"))?;
        if status != StatusCode::OK {
            bail!("metrics: {status}");
        }
        Ok(cpu_seconds(std::str::from_utf8(&self.body).context("metrics are not text")?))
    }

    /// `GET /v1/admin/audit`, as the server wrote it.
    pub async fn audit(&mut self) -> anyhow::Result<serde_json::Value> {
        let status = self
            .call(Method::GET, Uri::from_static("/v1/admin/audit"), Key::Admin, Bytes::new())
            .await
            .map_err(|e| anyhow!("audit: {e}"))?;
        if status != StatusCode::OK {
            bail!("audit: {status} {}", String::from_utf8_lossy(&self.body));
        }
        serde_json::from_slice(&self.body).context("audit answer is not JSON")
    }
}

/// The server's CPU seconds by what its threads do, from the `hongbao_cpu_seconds_total`
/// lines of its `/metrics`; `None` when it reports none (another server, or not Linux).
pub fn cpu_seconds(metrics: &str) -> Option<BTreeMap<String, f64>> {
    const FAMILY: &str = "hongbao_cpu_seconds_total{threads=\"";
    let found: BTreeMap<String, f64> = metrics
        .lines()
        .filter_map(|line| {
            let (kind, value) = line.strip_prefix(FAMILY)?.split_once("\"} ")?;
            Some((kind.to_string(), value.trim().parse().ok()?))
        })
        .collect();
    (!found.is_empty()).then_some(found)
}

/// The `dur` (milliseconds) of a `Server-Timing` header's `app` metric, as hongbao writes it:
/// `app;dur=1.234`.
pub fn server_timing(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    let metric = text.split(',').map(str::trim).find(|m| m.split(';').next() == Some("app"))?;
    let dur = metric.split(';').find_map(|p| p.trim().strip_prefix("dur="))?;
    let ms: f64 = dur.parse().ok()?;
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
}

/// The integer after `"amount":` in a claim's answer, without parsing the JSON.
pub fn scan_amount(body: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"amount\":";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = &body[at..];
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let digits = rest[start..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 18 {
        return None;
    }
    std::str::from_utf8(&rest[start..start + digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_servers_cpu_by_threads_from_its_metrics() {
        let metrics = "# TYPE hongbao_cpu_seconds_total counter\n\
                       hongbao_cpu_seconds_total{threads=\"tokio\"} 12.34\n\
                       hongbao_cpu_seconds_total{threads=\"fold\"} 0.50\n\
                       hongbao_cpu_seconds_total_other{threads=\"x\"} 9\n\
                       http_requests_total{route=\"/healthz\"} 7\n";
        let cpu = cpu_seconds(metrics).expect("two kinds");
        assert_eq!(cpu.len(), 2, "{cpu:?}");
        assert_eq!(cpu["tokio"], 12.34);
        assert_eq!(cpu["fold"], 0.5);
        assert_eq!(cpu_seconds("http_requests_total 7\n"), None);
    }

    #[test]
    fn reads_the_servers_time_from_server_timing() {
        let of = |v: &'static str| server_timing(&HeaderValue::from_static(v));
        assert_eq!(of("app;dur=1.234"), Some(Duration::from_micros(1234)));
        assert_eq!(of("app;dur=0.000"), Some(Duration::ZERO));
        assert_eq!(of("db;dur=5, app;desc=\"x\";dur=12.5"), Some(Duration::from_micros(12_500)));
        assert_eq!(of("db;dur=5"), None);
        assert_eq!(of("app"), None);
        assert_eq!(of("app;dur=-1"), None);
        assert_eq!(of("app;dur=x"), None);
    }

    #[test]
    fn scans_the_amount_of_a_claim() {
        let body = br#"{"packet_id":"123","user":"u1","amount":4321,"at":"2026-01-01T00:00:00Z"}"#;
        assert_eq!(scan_amount(body), Some(4321));
        assert_eq!(scan_amount(br#"{"amount": 7}"#), Some(7));
        assert_eq!(scan_amount(br#"{"total_amount":5}"#), None);
        assert_eq!(scan_amount(br#"{"amount":"x"}"#), None);
        assert_eq!(scan_amount(b""), None);
    }
}
