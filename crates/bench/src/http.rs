//! The HTTP client: one keep-alive HTTP/1.1 connection per task, spoken over tokio's
//! `TcpStream` directly. A request is formatted into a reused buffer and written with one
//! `write`; the answer's head is parsed in place by `httparse` (the parser hyper uses) and its
//! body is read by its `Content-Length` into another reused buffer. Nothing is allocated per
//! request, and one task does it all: the load generator shares the machine's two cores with
//! the server it measures, so what it spends per request is taken from the server.
//!
//! It speaks only what hongbao answers: no chunked bodies, no `100 Continue`, no pipelining.
//! Anything else is an error that drops the connection, and the next request reconnects.
//!
//! Until the twenty-third session this was hyper's connection-level client. Each request
//! crossed from the calling task to the connection's task and back (a channel, two wake-ups)
//! and built hyper's request, header map and response: 6–11 µs of the bench's user CPU per
//! festival claim, against 2.7–3.0 µs now (BENCHMARKS.md, twenty-third session).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::Answer;

/// Longest wait for one answer: past it the request is an error and its connection is
/// dropped (an HTTP/1.1 connection with a request stuck on it cannot carry another).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed connect, so a dead server is not hammered in a hot loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);
/// The first bytes of an unexpected answer kept in an error message.
const ERROR_BODY_CHARS_MAX: usize = 200;
/// Most header lines an answer may have (hongbao sends fewer than ten).
const HEADERS_MAX: usize = 32;
/// Longest answer head read before giving up on it.
const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Longest answer body read (`/metrics` and the audit are the long ones, a few KiB).
const BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Free room kept in the read buffer before each read.
const READ_ROOM: usize = 4096;

const OK: u16 = 200;
const CREATED: u16 = 201;
const GONE: u16 = 410;
const SERVICE_UNAVAILABLE: u16 = 503;

/// Where the server is and the keys to show it. Built once, shared by every connection.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    /// `HOST:PORT`, for the `Host` header.
    host: String,
    /// `Bearer KEY` for the service key and the admin key.
    service: String,
    admin: String,
}

impl Endpoint {
    /// `url` is `http://HOST:PORT` (a trailing slash or path is ignored).
    pub async fn new(url: &str, api_key: &str, admin_key: &str) -> anyhow::Result<Arc<Endpoint>> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--url must start with http:// (the bench speaks plain HTTP/1.1)"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.is_empty() || !authority.bytes().all(header_safe) || authority.contains('@') {
            bail!("--url {url} has no host, or a host the bench cannot use");
        }
        let addr = tokio::net::lookup_host(with_port(authority))
            .await
            .with_context(|| format!("cannot resolve {authority}"))?
            .next()
            .ok_or_else(|| anyhow!("{authority} resolves to no address"))?;
        let bearer = |key: &str| {
            if key.bytes().all(header_safe) {
                Ok(format!("Bearer {key}"))
            } else {
                Err(anyhow!("a key must be printable ASCII without spaces"))
            }
        };
        Ok(Arc::new(Endpoint {
            addr,
            host: authority.to_string(),
            service: bearer(api_key)?,
            admin: bearer(admin_key)?,
        }))
    }
}

/// `HOST:PORT` as `lookup_host` wants it: port 80 when the URL gives none.
fn with_port(authority: &str) -> String {
    let has_port = match authority.rsplit_once(':') {
        // `[::1]:8080` has one, `[::1]` has none.
        Some((host, port)) => {
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.is_empty()
        }
        None => false,
    };
    if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    }
}

/// A byte that may stand in a header value or a request path as the bench writes them:
/// printable ASCII, no space.
fn header_safe(b: u8) -> bool {
    b.is_ascii_graphic()
}

/// A user id that may stand in a path segment as it is.
fn path_segment_safe(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| header_safe(b) && !matches!(b, b'/' | b'?' | b'#' | b'%'))
}

#[derive(Debug, Clone, Copy)]
enum Key {
    None,
    Service,
    Admin,
}

/// What the head of an answer said.
struct Head {
    status: u16,
    /// The head's length in bytes.
    len: usize,
    content_length: usize,
    close: bool,
    server_time: Option<Duration>,
}

/// One connection and the buffers it reuses. Owned by one task.
pub struct HttpClient {
    endpoint: Arc<Endpoint>,
    stream: Option<TcpStream>,
    /// The request being sent, head and body.
    out: Vec<u8>,
    /// Where request bodies are formatted.
    scratch: String,
    /// The last answer, head and body, as read.
    answer: Vec<u8>,
    /// Where the last answer's body is in `answer`.
    body: Range<usize>,
    /// The server's own time for the last answer (`Server-Timing: app;dur=`), if it said.
    server_time: Option<Duration>,
}

impl HttpClient {
    pub async fn connect(endpoint: Arc<Endpoint>) -> anyhow::Result<HttpClient> {
        let mut c = HttpClient {
            endpoint,
            stream: None,
            out: Vec::with_capacity(512),
            scratch: String::with_capacity(256),
            answer: Vec::with_capacity(READ_ROOM),
            body: 0..0,
            server_time: None,
        };
        c.reconnect().await.map_err(|e| anyhow!(e))?;
        Ok(c)
    }

    async fn reconnect(&mut self) -> Result<(), String> {
        self.stream = None;
        let stream = TcpStream::connect(self.endpoint.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.endpoint.addr))?;
        // Requests are small and answered one at a time: Nagle would only add delay.
        stream.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        self.stream = Some(stream);
        Ok(())
    }

    /// The last answer's body.
    fn body(&self) -> &[u8] {
        &self.answer[self.body.clone()]
    }

    /// Formats `method path` with `self.scratch` as its body (JSON, when not empty) into
    /// `self.out`, for [`HttpClient::exchange`]. Not part of it because `fmt::Arguments` is
    /// not `Send`, and a load task's future must be.
    fn request(&mut self, method: &str, path: fmt::Arguments<'_>, key: Key) {
        self.out.clear();
        let _ = write!(self.out, "{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.endpoint.host);
        let bearer = match key {
            Key::None => None,
            Key::Service => Some(&self.endpoint.service),
            Key::Admin => Some(&self.endpoint.admin),
        };
        if let Some(bearer) = bearer {
            let _ = write!(self.out, "Authorization: {bearer}\r\n");
        }
        if !self.scratch.is_empty() {
            let _ = write!(
                self.out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                self.scratch.len()
            );
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(self.scratch.as_bytes());
    }

    /// [`HttpClient::request`] for a `GET`, which has no body.
    fn get(&mut self, path: fmt::Arguments<'_>, key: Key) {
        self.scratch.clear();
        self.request("GET", path, key);
    }

    /// Sends the request in `self.out` and reads the whole answer; its body is then
    /// [`HttpClient::body`].
    async fn exchange(&mut self) -> Result<u16, String> {
        self.server_time = None;
        self.body = 0..0;
        if self.stream.is_none() {
            if let Err(e) = self.reconnect().await {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                return Err(e);
            }
        }
        let stream = self.stream.as_mut().expect("connected above");
        let (out, answer) = (&self.out, &mut self.answer);
        let exchange = async {
            stream.write_all(out).await.map_err(|e| format!("sending the request: {e}"))?;
            read_answer(stream, answer).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(head)) => {
                if head.close {
                    self.stream = None;
                }
                self.body = head.len..head.len + head.content_length;
                self.server_time = head.server_time;
                Ok(head.status)
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                Err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))
            }
        }
    }

    /// What the server said its last answer took (`Server-Timing`); `None` if it did not say,
    /// or the request got no answer.
    pub fn server_time(&self) -> Option<Duration> {
        self.server_time
    }

    fn unexpected(&self, what: &str, status: u16) -> Answer {
        let body = String::from_utf8_lossy(self.body());
        let body: String = body.chars().take(ERROR_BODY_CHARS_MAX).collect();
        Answer::Error(format!("{what}: {status} {body}"))
    }

    /// `POST /v1/packets/{id}/claim {user}`.
    pub async fn claim(&mut self, packet: u64, user: &str) -> Answer {
        self.scratch.clear();
        let _ = write!(self.scratch, r#"{{"user":"{user}"}}"#);
        self.request("POST", format_args!("/v1/packets/{packet}/claim"), Key::Service);
        match self.exchange().await {
            Ok(OK) => match scan_amount(self.body()) {
                Some(fen) => Answer::Paid(fen),
                None => self.unexpected("claim answered 200 without an amount", OK),
            },
            Ok(GONE) => Answer::Away,
            Ok(SERVICE_UNAVAILABLE) => Answer::Overloaded,
            Ok(status) => self.unexpected("claim", status),
            Err(e) => Answer::Error(e),
        }
    }

    /// `GET /healthz`.
    pub async fn healthz(&mut self) -> Answer {
        self.get(format_args!("/healthz"), Key::None);
        match self.exchange().await {
            Ok(OK) => Answer::Done,
            Ok(SERVICE_UNAVAILABLE) => Answer::Overloaded,
            Ok(status) => self.unexpected("healthz", status),
            Err(e) => Answer::Error(e),
        }
    }

    /// A page of what a user received, or of what they sent.
    pub async fn history(&mut self, user: &str, sent: bool) -> Answer {
        if !path_segment_safe(user) {
            return Answer::Error(format!("bad user id {user}"));
        }
        let what = if sent { "sent" } else { "received" };
        self.get(format_args!("/v1/users/{user}/{what}?limit=20"), Key::Service);
        match self.exchange().await {
            Ok(OK) => Answer::Done,
            Ok(SERVICE_UNAVAILABLE) => Answer::Overloaded,
            Ok(status) => self.unexpected(what, status),
            Err(e) => Answer::Error(e),
        }
    }

    /// `POST /v1/wallets/{user}/deposit` with the admin key.
    pub async fn deposit(&mut self, user: &str, amount_fen: i64, request_id: &str) -> Answer {
        if !path_segment_safe(user) {
            return Answer::Error(format!("bad user id {user}"));
        }
        self.scratch = serde_json::json!({ "amount": amount_fen, "request_id": request_id }).to_string();
        self.request("POST", format_args!("/v1/wallets/{user}/deposit"), Key::Admin);
        match self.exchange().await {
            Ok(OK) => Answer::Done,
            Ok(SERVICE_UNAVAILABLE) => Answer::Overloaded,
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
        self.scratch = serde_json::json!({
            "sender": sender, "kind": "lucky", "total_amount": total_fen, "count": count,
            "audience": { "anyone": true }, "expires_in_s": expires_in_s, "request_id": request_id,
        })
        .to_string();
        self.request("POST", format_args!("/v1/packets"), Key::Service);
        match self.exchange().await {
            Ok(CREATED | OK) => {
                let id = serde_json::from_slice::<serde_json::Value>(self.body())
                    .ok()
                    .and_then(|v| v.get("id").and_then(|id| id.as_str()).and_then(|s| s.parse::<u64>().ok()));
                match id {
                    Some(id) => (Answer::Done, Some(id)),
                    None => (self.unexpected("send answered without an id", CREATED), None),
                }
            }
            Ok(SERVICE_UNAVAILABLE) => (Answer::Overloaded, None),
            Ok(status) => (self.unexpected("send", status), None),
            Err(e) => (Answer::Error(e), None),
        }
    }

    /// `GET /metrics`: the server's CPU seconds by what its threads do ([`cpu_seconds`]).
    pub async fn cpu_seconds(&mut self) -> anyhow::Result<Option<BTreeMap<String, f64>>> {
        self.get(format_args!("/metrics"), Key::None);
        let status = self.exchange().await.map_err(|e| anyhow!("metrics: {e}"))?;
        if status != OK {
            bail!("metrics: {status}");
        }
        Ok(cpu_seconds(std::str::from_utf8(self.body()).context("metrics are not text")?))
    }

    /// `GET /v1/admin/audit`, as the server wrote it.
    pub async fn audit(&mut self) -> anyhow::Result<serde_json::Value> {
        self.get(format_args!("/v1/admin/audit"), Key::Admin);
        let status = self.exchange().await.map_err(|e| anyhow!("audit: {e}"))?;
        if status != OK {
            bail!("audit: {status} {}", String::from_utf8_lossy(self.body()));
        }
        serde_json::from_slice(self.body()).context("audit answer is not JSON")
    }
}

/// Reads one whole answer into `buf` (emptied first) and says what its head holds. The body
/// follows the head in `buf`.
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Head, String> {
    buf.clear();
    let head = loop {
        fill(stream, buf).await?;
        if let Some(head) = parse_head(buf)? {
            break head;
        }
        if buf.len() > HEAD_BYTES_MAX {
            return Err(format!("an answer's head is longer than {HEAD_BYTES_MAX} bytes"));
        }
    };
    let end = head.len + head.content_length;
    while buf.len() < end {
        fill(stream, buf).await?;
    }
    if buf.len() > end {
        return Err("the server sent more than one answer to one request".to_string());
    }
    Ok(head)
}

/// Reads what the socket has into `buf`'s spare room; an error when the server has closed.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    buf.reserve(READ_ROOM);
    match stream.read_buf(buf).await {
        Ok(0) => Err("the server closed the connection before it answered".to_string()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("reading the answer: {e}")),
    }
}

/// The head of the answer at the start of `buf`, or `None` when it is not all there yet.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut answer = httparse::Response::new(&mut headers);
    let len = match answer.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the answer is not HTTP: {e}")),
    };
    let status = answer.code.unwrap_or_default();
    let mut head = Head { status, len, content_length: 0, close: false, server_time: None };
    let mut has_length = false;
    for h in answer.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            head.content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n| n <= BODY_BYTES_MAX)
                .ok_or_else(|| format!("bad Content-Length {:?}", String::from_utf8_lossy(h.value)))?;
            has_length = true;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("the answer is chunked: the bench reads bodies by their Content-Length".to_string());
        } else if h.name.eq_ignore_ascii_case("connection") {
            head.close = h.value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("server-timing") {
            head.server_time = server_timing(h.value);
        }
    }
    if status < 200 {
        return Err(format!("an interim {status} answer, which the bench never asks for"));
    }
    // Without a length an answer runs to the end of the connection, which this client does
    // not read; 204 and 304 answers have no body.
    if !has_length && status != 204 && status != 304 {
        return Err(format!("a {status} answer without a Content-Length"));
    }
    Ok(Some(head))
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
pub fn server_timing(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let of = |v: &'static str| server_timing(v.as_bytes());
        assert_eq!(of("app;dur=1.234"), Some(Duration::from_micros(1234)));
        assert_eq!(of("app;dur=0.000"), Some(Duration::ZERO));
        assert_eq!(of("db;dur=5, app;desc=\"x\";dur=12.5"), Some(Duration::from_micros(12_500)));
        assert_eq!(of("db;dur=5"), None);
        assert_eq!(of("app"), None);
        assert_eq!(of("app;dur=-1"), None);
        assert_eq!(of("app;dur=x"), None);
    }

    #[test]
    fn parses_an_answers_head_in_place() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nserver-timing: app;dur=0.250\r\n\
                       Content-Length: 13\r\n\r\n{\"amount\":42}";
        let head = parse_head(answer).expect("valid").expect("complete");
        assert_eq!(head.status, 200);
        assert_eq!(head.len + head.content_length, answer.len());
        assert_eq!(&answer[head.len..], br#"{"amount":42}"#);
        assert_eq!(head.server_time, Some(Duration::from_micros(250)));
        assert!(!head.close);

        // Not all there yet: read more and parse again.
        assert!(parse_head(b"HTTP/1.1 410 Gone\r\ncontent-len").expect("valid so far").is_none());

        let closing =
            parse_head(b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                .expect("valid")
                .expect("complete");
        assert_eq!((closing.status, closing.content_length, closing.close), (503, 0, true));
    }

    #[test]
    fn refuses_answers_it_cannot_read_by_their_length() {
        let err = |a: &[u8]| {
            parse_head(a).err().unwrap_or_else(|| panic!("accepted {}", String::from_utf8_lossy(a)))
        };
        assert!(err(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").contains("chunked"));
        assert!(err(b"HTTP/1.1 200 OK\r\n\r\n").contains("without a Content-Length"));
        assert!(err(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").contains("Content-Length"));
        assert!(err(b"HTTP/1.1 100 Continue\r\n\r\n").contains("interim"));
        assert!(err(b"SSH-2.0-OpenSSH\r\n\r\n").contains("not HTTP"));
        // 204 has no body, and needs no length.
        let empty = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n").expect("valid").expect("complete");
        assert_eq!(empty.content_length, 0);
    }

    #[test]
    fn finds_the_port_of_a_url_or_takes_80() {
        assert_eq!(with_port("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(with_port("localhost"), "localhost:80");
        assert_eq!(with_port("[::1]:9000"), "[::1]:9000");
        assert_eq!(with_port("[::1]"), "[::1]:80");
        assert!(path_segment_safe("f1a2b3u0x17"));
        assert!(!path_segment_safe("a/b") && !path_segment_safe("a b") && !path_segment_safe(""));
    }

    /// A server of one connection at a time that answers each request with the next of
    /// `answers`, each written in pieces of `piece` bytes with a pause between them, and
    /// closes the connection after an answer that says so. Returns its URL and the requests
    /// it read, head and body, as one string each.
    async fn scripted_server(
        answers: Vec<&'static str>,
        piece: usize,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        let (seen, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            'conns: while let Ok((mut conn, _)) = listener.accept().await {
                loop {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    // A request is a head and, when it says so, a body of its length.
                    let whole = loop {
                        let n = conn.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            continue 'conns;
                        }
                        request.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&request).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("Content-Length: "))
                                .map_or(0, |n| n.parse::<usize>().expect("length"));
                            if body.len() >= len {
                                break text;
                            }
                        }
                    };
                    let _ = seen.send(whole);
                    let Some(answer) = answers.next() else { return };
                    for part in answer.as_bytes().chunks(piece) {
                        conn.write_all(part).await.expect("write");
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    if answer.contains("connection: close") {
                        continue 'conns;
                    }
                }
            }
        });
        (url, requests)
    }

    #[tokio::test]
    async fn reads_answers_that_arrive_in_pieces_and_reconnects_after_a_close() {
        let (url, mut requests) = scripted_server(
            vec![
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nserver-timing: app;dur=1.500\r\n\
                 content-length: 51\r\n\r\n{\"packet_id\":\"7\",\"user\":\"u1\",\"amount\":321,\"at\":\"x\"}",
                "HTTP/1.1 410 Gone\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            ],
            7,
        )
        .await;
        let endpoint = Endpoint::new(&url, "svc-key", "adm-key").await.expect("endpoint");
        let mut client = HttpClient::connect(endpoint).await.expect("connect");

        assert_eq!(client.claim(7, "u1").await, Answer::Paid(321));
        assert_eq!(client.server_time(), Some(Duration::from_micros(1500)));
        let sent = requests.recv().await.expect("the claim");
        assert!(sent.starts_with("POST /v1/packets/7/claim HTTP/1.1\r\nHost: 127.0.0.1:"), "{sent}");
        assert!(sent.contains("\r\nAuthorization: Bearer svc-key\r\n"), "{sent}");
        assert!(sent.contains("\r\nContent-Type: application/json\r\nContent-Length: 13\r\n"), "{sent}");
        assert!(sent.ends_with("\r\n\r\n{\"user\":\"u1\"}"), "{sent}");

        // Turned away, on an answer that closes the connection: the next request reconnects.
        assert_eq!(client.claim(7, "u2").await, Answer::Away);
        assert_eq!(client.server_time(), None);
        assert!(client.stream.is_none(), "the server said it closes");
        requests.recv().await.expect("the second claim");
        assert_eq!(client.healthz().await, Answer::Done);
        let sent = requests.recv().await.expect("the health check");
        assert!(sent.starts_with("GET /healthz HTTP/1.1\r\n"), "{sent}");
        assert!(!sent.contains("Authorization") && !sent.contains("Content-Length"), "{sent}");

        // The server has no answer left and closes: an error, not a hang, and no stale stream.
        match client.healthz().await {
            Answer::Error(e) => assert!(e.contains("closed the connection"), "{e}"),
            other => panic!("expected an error, got {other:?}"),
        }
        assert!(client.stream.is_none());
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
