//! Black-box test support: runs the real `hongbao` binary on a free port with its own data dir,
//! and talks to it over HTTP like any client would.
//!
//! Everything here fails loudly: a server that cannot start panics with what it wrote to
//! stderr, so no test ever passes by not running. The helpers never look inside the process.

#![allow(dead_code)]

pub mod load;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

/// The service key every test server runs with.
pub const API_KEY: &str = "test-service-key-4f1c2a9e";
/// The admin key every test server runs with.
pub const ADMIN_KEY: &str = "test-admin-key-8b3d7e01";

/// How long a server gets to print its listening line: a cold debug build on a loaded 2-core
/// machine loads in well under a second, so half a minute means it is stuck.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM may take to end the process.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long credits between sets get to arrive before `settle` fails.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Every request gives up after this: a hung server fails the test instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the server's stderr kept for failure messages.
const STDERR_LINES_MAX: usize = 400;
/// Page size used when a helper walks every page of a list.
const PAGE_LIMIT: u32 = 100;

const LISTENING_PREFIX: &str = "hongbao listening on ";

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct Opts {
    /// `--sets N`; the server's default when `None`.
    pub sets: Option<u32>,
    /// `--hold-s S`; the server's default (30 s) when `None`.
    pub hold_s: Option<u32>,
    /// Any further `serve` arguments, e.g. `["--user-rate", "2"]`.
    pub args: Vec<String>,
    /// The server's `RUST_LOG` unless the environment sets one; `warn` when `None`.
    pub log: Option<&'static str>,
}

impl Opts {
    pub fn sets(n: u32) -> Opts {
        Opts { sets: Some(n), ..Opts::default() }
    }

    pub fn hold_s(s: u32) -> Opts {
        Opts { hold_s: Some(s), ..Opts::default() }
    }
}

/// A running `hongbao serve` process with its data dir. Dropping it kills the process and
/// removes the dir.
pub struct TestServer {
    child: Option<Child>,
    api: Api,
    opts: Opts,
    data: PathBuf,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// With `HONGBAO_TEST_STORE=postgres`, the throwaway PostgreSQL cluster the server stores
    /// into (`--store`); it outlives restarts and goes with the server.
    pg: Option<hongbao_testkit::PgCluster>,
    /// Owns the data dir; declared last so it is removed after the process is gone.
    _dir: Option<tempfile::TempDir>,
}

/// Which store the suite runs against: `HONGBAO_TEST_STORE=postgres` runs every black-box
/// test on a real PostgreSQL started for it; anything else (or unset) on SQLite.
fn postgres_wanted() -> bool {
    match std::env::var("HONGBAO_TEST_STORE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Err(_) => false,
        Ok(other) => panic!("HONGBAO_TEST_STORE must be `sqlite` or `postgres`, not {other:?}"),
    }
}

impl TestServer {
    /// Starts a server on a fresh data dir.
    pub async fn start(opts: Opts) -> TestServer {
        TestServer::start_fresh(opts, postgres_wanted().then(hongbao_testkit::PgCluster::start)).await
    }

    async fn start_fresh(opts: Opts, pg: Option<hongbao_testkit::PgCluster>) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("hongbao-test-")
            .tempdir()
            .expect("cannot create a temp data dir");
        let data = dir.path().to_path_buf();
        let mut server = TestServer {
            child: None,
            api: Api::new(String::new()),
            opts,
            data,
            stderr: Arc::new(Mutex::new(VecDeque::new())),
            pg,
            _dir: Some(dir),
        };
        server.spawn().await;
        server
    }

    /// Starts a server on an existing data dir, which the caller keeps.
    pub async fn start_in(opts: Opts, data: &Path) -> TestServer {
        let mut server = TestServer {
            child: None,
            api: Api::new(String::new()),
            opts,
            data: data.to_path_buf(),
            stderr: Arc::new(Mutex::new(VecDeque::new())),
            pg: postgres_wanted().then(hongbao_testkit::PgCluster::start),
            _dir: None,
        };
        server.spawn().await;
        server
    }

    /// Starts a server on a fresh data dir storing into `pg`, whatever `HONGBAO_TEST_STORE`
    /// says: for tests of PostgreSQL-only features (archive, replicas).
    pub async fn start_on_postgres(opts: Opts, pg: hongbao_testkit::PgCluster) -> TestServer {
        TestServer::start_fresh(opts, Some(pg)).await
    }

    /// The PostgreSQL cluster the server stores into, if it runs on PostgreSQL.
    pub fn pg(&self) -> Option<&hongbao_testkit::PgCluster> {
        self.pg.as_ref()
    }

    pub fn api(&self) -> Api {
        self.api.clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is not running").id()
    }

    /// [`Api::settle`], and a failure says what the server logged last.
    pub async fn settle(&self) -> Value {
        self.api.settle_telling(|| format!("server stderr, last lines:\n{}", self.stderr_tail())).await
    }

    /// The last lines the server wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let lines = self.stderr.lock().expect("stderr lock");
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// `kill -9`: the process dies at once, whatever it was doing.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("cannot kill the server");
            child.wait().expect("cannot reap the server");
        }
    }

    /// SIGTERM, then waits for a clean exit (status 0).
    pub async fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let status =
            Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().expect("cannot run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(exit) = child.try_wait().expect("cannot wait for the server") {
                assert!(
                    exit.success(),
                    "server exited with {exit} after SIGTERM; stderr:\n{}",
                    self.stderr_tail()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not exit within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the server again on the same data dir (killing it first if it still runs).
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hongbao"));
        cmd.arg("serve").arg("--listen").arg("127.0.0.1:0").arg("--data").arg(&self.data);
        if let Some(n) = self.opts.sets {
            cmd.arg("--sets").arg(n.to_string());
        }
        if let Some(s) = self.opts.hold_s {
            cmd.arg("--hold-s").arg(s.to_string());
        }
        if let Some(pg) = &self.pg {
            cmd.arg("--store").arg(pg.url());
        }
        cmd.args(&self.opts.args);
        cmd.env("HONGBAO_API_KEY", API_KEY)
            .env("HONGBAO_ADMIN_KEY", ADMIN_KEY)
            .env_remove("HONGBAO_SETS")
            .env_remove("HONGBAO_HOLD_S")
            .env_remove("HONGBAO_LISTEN")
            .env_remove("HONGBAO_DATA")
            .env_remove("HONGBAO_CONFIG")
            .env_remove("HONGBAO_STORE")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| self.opts.log.unwrap_or("warn").into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot spawn the hongbao binary");

        let stderr = child.stderr.take().expect("stderr piped");
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        self.stderr = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut t = tail.lock().expect("stderr lock");
                if t.len() == STDERR_LINES_MAX {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });

        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Keep draining after the listening line so the server never blocks on stdout.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line);
                }
            }
        });

        let deadline = Instant::now() + START_TIMEOUT;
        let line = loop {
            match rx.try_recv() {
                Ok(line) => break line,
                Err(mpsc::TryRecvError::Disconnected) | Err(mpsc::TryRecvError::Empty) => {}
            }
            if let Some(exit) = child.try_wait().expect("cannot wait for the server") {
                // Give the stderr thread a moment to collect the last words.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "hongbao exited with {exit} before listening (data {}); stderr:\n{}",
                    self.data.display(),
                    self.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hongbao printed no listening line within {START_TIMEOUT:?}; stderr:\n{}",
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if self.pg.is_some() {
            assert!(
                !self.data.join("set-0.sqlite").exists(),
                "HONGBAO_TEST_STORE=postgres, yet the server wrote SQLite files"
            );
        }
        let base = line
            .strip_prefix(LISTENING_PREFIX)
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("unexpected first stdout line {line:?}; stderr:\n{}", self.stderr_tail())
            })
            .trim()
            .to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "bad listening address {base:?}");
        self.child = Some(child);
        self.api = Api::new(base);
    }
}

impl std::ops::Deref for TestServer {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP reply, the body parsed as JSON when it is JSON (else a JSON string of the text).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub content_type: String,
    pub retry_after: Option<String>,
}

/// A cheap, cloneable client for one server address.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// A request id no other request of this test process uses.
pub fn rid(prefix: &str) -> String {
    format!("{prefix}-{}", REQUEST_SEQ.fetch_add(1, Ordering::Relaxed))
}

pub fn users(list: &[&str]) -> Value {
    json!({ "users": list })
}

pub fn anyone() -> Value {
    json!({ "anyone": true })
}

/// A JSON number or string, as a query parameter value.
pub fn cursor_param(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Api {
    pub fn new(base: String) -> Api {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .expect("cannot build the HTTP client");
        Api { base, client }
    }

    /// The same server through another (shared) client.
    pub fn with_client(&self, client: reqwest::Client) -> Api {
        Api { base: self.base.clone(), client }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request with a raw body (sent as `application/json`), or none.
    pub async fn try_raw(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, reqwest::Error> {
        let mut req = self.client.request(method, self.url(path));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let content_type = header("content-type").unwrap_or_default();
        let retry_after = header("retry-after");
        let bytes = resp.bytes().await?;
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(Reply { status, body, content_type, retry_after })
    }

    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Reply, reqwest::Error> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("serialise body"));
        self.try_raw(method, path, key, bytes).await
    }

    pub async fn raw(&self, method: Method, path: &str, key: Option<&str>, body: Option<Vec<u8>>) -> Reply {
        let what = format!("{method} {path}");
        self.try_raw(method, path, key, body).await.unwrap_or_else(|e| panic!("{what}: no answer: {e}"))
    }

    pub async fn call(&self, method: Method, path: &str, key: Option<&str>, body: Option<&Value>) -> Reply {
        let what = format!("{method} {path}");
        self.try_call(method, path, key, body).await.unwrap_or_else(|e| panic!("{what}: no answer: {e}"))
    }

    async fn pair(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let r = self.call(method, path, key, body).await;
        (r.status, r.body)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.pair(Method::GET, path, Some(API_KEY), None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.pair(Method::POST, path, Some(API_KEY), Some(body)).await
    }

    pub async fn admin_post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.pair(Method::POST, path, Some(ADMIN_KEY), Some(body)).await
    }

    // Wallets.

    pub async fn deposit(&self, user: &str, amount: i64, request_id: &str) -> (u16, Value) {
        let body = json!({ "amount": amount, "request_id": request_id });
        self.admin_post(&format!("/v1/wallets/{user}/deposit"), &body).await
    }

    /// Deposits with a fresh request id and returns the new balance.
    pub async fn deposit_ok(&self, user: &str, amount: i64) -> i64 {
        let (status, body) = self.deposit(user, amount, &rid("dep")).await;
        assert_eq!(status, 200, "deposit {amount} to {user}: {body}");
        body["balance"].as_i64().expect("balance is an integer")
    }

    pub async fn withdraw(&self, user: &str, amount: i64, request_id: &str) -> (u16, Value) {
        let body = json!({ "amount": amount, "request_id": request_id });
        self.post(&format!("/v1/wallets/{user}/withdraw"), &body).await
    }

    pub async fn wallet(&self, user: &str) -> (u16, Value) {
        self.get(&format!("/v1/wallets/{user}")).await
    }

    pub async fn balance(&self, user: &str) -> i64 {
        let (status, body) = self.wallet(user).await;
        assert_eq!(status, 200, "wallet of {user}: {body}");
        assert_eq!(body["user"], user, "wallet reply names its user");
        body["balance"].as_i64().unwrap_or_else(|| panic!("balance of {user} is not an integer: {body}"))
    }

    pub async fn entries(&self, user: &str, query: &str) -> (u16, Value) {
        self.get(&format!("/v1/wallets/{user}/entries{query}")).await
    }

    /// Every entry of a wallet, walking the pages.
    pub async fn entries_all(&self, user: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut query = format!("?limit={PAGE_LIMIT}");
        for _ in 0..10_000 {
            let (status, body) = self.entries(user, &query).await;
            assert_eq!(status, 200, "entries of {user}: {body}");
            all.extend(body["entries"].as_array().expect("entries is an array").iter().cloned());
            match &body["next_cursor"] {
                Value::Null => return all,
                c => query = format!("?limit={PAGE_LIMIT}&cursor={}", cursor_param(c)),
            }
        }
        panic!("entries of {user} never ended");
    }

    // Packets.

    pub async fn send(&self, body: &Value) -> (u16, Value) {
        self.post("/v1/packets", body).await
    }

    /// Sends a packet that must be accepted; returns its id.
    pub async fn send_ok(&self, sender: &str, kind: &str, total: i64, count: i64, audience: Value) -> String {
        let body = json!({
            "sender": sender, "kind": kind, "total_amount": total, "count": count,
            "audience": audience, "request_id": rid("send"),
        });
        let (status, reply) = self.send(&body).await;
        assert_eq!(status, 201, "send {body}: {reply}");
        reply["id"].as_str().unwrap_or_else(|| panic!("packet id is not a string: {reply}")).to_string()
    }

    pub async fn packet(&self, id: &str) -> (u16, Value) {
        self.get(&format!("/v1/packets/{id}")).await
    }

    /// A packet's details with the claims of every page in one `claims` array.
    pub async fn packet_full(&self, id: &str) -> Value {
        let (status, mut first) = self.packet(id).await;
        assert_eq!(status, 200, "details of packet {id}: {first}");
        let mut claims: Vec<Value> = first["claims"].as_array().expect("claims is an array").clone();
        let mut next = first["next_cursor"].clone();
        let mut pages = 0;
        while !next.is_null() {
            pages += 1;
            assert!(pages < 10_000, "claims of packet {id} never ended");
            let path = format!("/v1/packets/{id}?limit={PAGE_LIMIT}&cursor={}", cursor_param(&next));
            let (status, page) = self.get(&path).await;
            assert_eq!(status, 200, "GET {path}: {page}");
            claims.extend(page["claims"].as_array().expect("claims is an array").iter().cloned());
            next = page["next_cursor"].clone();
        }
        first["claims"] = Value::Array(claims);
        first["next_cursor"] = Value::Null;
        first
    }

    pub async fn grab(&self, id: &str, user: &str) -> (u16, Value) {
        self.post(&format!("/v1/packets/{id}/grab"), &json!({ "user": user })).await
    }

    pub async fn open(&self, id: &str, user: &str) -> (u16, Value) {
        self.post(&format!("/v1/packets/{id}/open"), &json!({ "user": user })).await
    }

    pub async fn claim(&self, id: &str, user: &str) -> (u16, Value) {
        self.post(&format!("/v1/packets/{id}/claim"), &json!({ "user": user })).await
    }

    /// Claims a share that must be paid; returns the amount.
    pub async fn claim_ok(&self, id: &str, user: &str) -> i64 {
        let (status, body) = self.claim(id, user).await;
        assert_eq!(status, 200, "claim of packet {id} by {user}: {body}");
        assert_eq!(body["packet_id"].as_str(), Some(id), "claim reply names its packet: {body}");
        assert_eq!(body["user"], user, "claim reply names its user: {body}");
        body["amount"].as_i64().unwrap_or_else(|| panic!("claim amount is not an integer: {body}"))
    }

    // Histories.

    pub async fn received(&self, user: &str, query: &str) -> (u16, Value) {
        self.get(&format!("/v1/users/{user}/received{query}")).await
    }

    pub async fn sent(&self, user: &str, query: &str) -> (u16, Value) {
        self.get(&format!("/v1/users/{user}/sent{query}")).await
    }

    // Audit.

    pub async fn audit(&self) -> Value {
        let r = self.call(Method::GET, "/v1/admin/audit", Some(ADMIN_KEY), None).await;
        assert_eq!(r.status, 200, "audit: {}", r.body);
        r.body
    }

    /// Polls the audit until no credit is in flight between sets; returns that audit, which
    /// must be ok and conserve money.
    pub async fn settle(&self) -> Value {
        self.settle_telling(String::new).await
    }

    /// As [`Api::settle`]; a failure's message ends with what `context` says then.
    pub async fn settle_telling(&self, context: impl Fn() -> String) -> Value {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let audit = self.audit().await;
            if let Err(why) = audit_problem(&audit) {
                panic!("{why}\n{}", context());
            }
            if audit["in_flight"].as_i64() == Some(0) {
                return audit;
            }
            assert!(
                Instant::now() < deadline,
                "credits still in flight after {SETTLE_TIMEOUT:?}: {audit}\n{}",
                context()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn int(v: &Value, field: &str) -> i64 {
    v[field].as_i64().unwrap_or_else(|| panic!("{field} is not an integer in {v}"))
}

/// DESIGN.md §2.1 as the audit reports it: ok, and deposits − withdrawals = balances + escrow
/// + in flight.
pub fn assert_audit_ok(audit: &Value) {
    if let Err(why) = audit_problem(audit) {
        panic!("{why}");
    }
}

/// What is wrong with an audit by DESIGN.md §2.1, if anything.
fn audit_problem(audit: &Value) -> Result<(), String> {
    if audit["ok"] != true {
        return Err(format!("audit not ok: {audit}"));
    }
    let (d, w) = (int(audit, "deposits"), int(audit, "withdrawals"));
    let (b, e, f) = (int(audit, "balances"), int(audit, "escrow"), int(audit, "in_flight"));
    if d - w != b + e + f {
        return Err(format!("conservation broken: {audit}"));
    }
    if b < 0 || e < 0 || f < 0 {
        return Err(format!("negative audit figure: {audit}"));
    }
    Ok(())
}

/// The money figures of an audit, to compare before and after something that must move none.
pub fn money(audit: &Value) -> [i64; 5] {
    ["deposits", "withdrawals", "balances", "escrow", "in_flight"].map(|f| int(audit, f))
}

/// Asserts an error reply: status, `application/problem+json`, and the stable `code`.
pub fn assert_problem(what: &str, status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(
        (status, body["code"].as_str()),
        (want_status, Some(want_code)),
        "{what}: want {want_status} {want_code}, got {status} {body}"
    );
}

/// Same, from a full reply, also checking the media type.
pub fn assert_problem_reply(what: &str, r: &Reply, want_status: u16, want_code: &str) {
    assert_problem(what, r.status, &r.body, want_status, want_code);
    assert!(
        r.content_type.starts_with("application/problem+json"),
        "{what}: error content-type is {:?}, want application/problem+json",
        r.content_type
    );
}

/// A packet as its details report it, with what the checks below need.
#[derive(Debug, Clone)]
pub struct PacketView {
    pub id: String,
    pub kind: String,
    pub total: i64,
    pub count: i64,
    pub status: String,
    /// (user, amount) in the order the details list them (opening order).
    pub claims: Vec<(String, i64)>,
}

impl PacketView {
    pub fn from_details(d: &Value) -> PacketView {
        let claims = d["claims"]
            .as_array()
            .expect("claims is an array")
            .iter()
            .map(|c| {
                let user = c["user"].as_str().expect("claim user is a string").to_string();
                let amount = c["amount"].as_i64().expect("claim amount is an integer");
                assert!(c["at"].is_string(), "claim has an `at` time: {c}");
                (user, amount)
            })
            .collect();
        PacketView {
            id: d["id"].as_str().expect("id is a string").to_string(),
            kind: d["kind"].as_str().expect("kind is a string").to_string(),
            total: int(d, "total_amount"),
            count: int(d, "count"),
            status: d["status"].as_str().expect("status is a string").to_string(),
            claims,
        }
    }

    pub fn paid(&self) -> i64 {
        self.claims.iter().map(|(_, a)| a).sum()
    }
}

/// DESIGN.md §2 items 2–5 for one packet that has not expired, as far as they show from
/// outside, on details with every page of claims. `audience` is the group, or `None` for
/// anyone.
pub fn check_packet(d: &Value, audience: Option<&HashSet<String>>) -> PacketView {
    let p = PacketView::from_details(d);
    let id = &p.id;
    let n = p.claims.len() as i64;
    // §2.2: never more shares than count, never more money than total.
    assert!(n <= p.count, "packet {id} paid {n} shares of {}", p.count);
    assert!(p.paid() <= p.total, "packet {id} paid {} of {}", p.paid(), p.total);
    // §2.5: one share per user.
    let distinct: HashSet<&str> = p.claims.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(distinct.len(), p.claims.len(), "packet {id} pays a user twice: {:?}", p.claims);
    // §2.3 and §2.4.
    let mut remaining = p.total;
    for (i, (user, amount)) in p.claims.iter().enumerate() {
        assert!(*amount >= 1, "packet {id}: share of {user} is {amount}");
        assert!(
            *amount <= p.total - (p.count - 1),
            "packet {id}: share {amount} leaves some share under 1 fen"
        );
        if let Some(group) = audience {
            assert!(group.contains(user), "packet {id} paid {user}, who is not in its audience");
        }
        match p.kind.as_str() {
            "equal" => {
                assert_eq!(*amount, p.total / p.count, "packet {id}: unequal share of an equal packet")
            }
            "lucky" => {
                // The details list claims in opening order, so the remaining average at each
                // opening is known: the double-average rule, except for the last share.
                let left = p.count - i as i64;
                if left > 1 {
                    assert!(
                        *amount <= remaining * 2 / left,
                        "packet {id}: share #{i} {amount} above twice the remaining average ({remaining} for {left})"
                    );
                }
            }
            other => panic!("packet {id} has kind {other:?}"),
        }
        remaining -= amount;
    }
    assert_eq!(int(d, "remaining_count"), p.count - n, "packet {id} remaining_count: {d}");
    if n == p.count {
        assert_eq!(p.paid(), p.total, "packet {id} fully opened but shares sum to {}", p.paid());
        assert_eq!(p.status, "exhausted", "packet {id} fully opened: {d}");
        assert_eq!(int(d, "remaining_amount"), 0, "packet {id}: {d}");
        let best = &d["best_luck"];
        let max = p.claims.iter().map(|(_, a)| *a).max().expect("a share");
        assert_eq!(best["amount"].as_i64(), Some(max), "packet {id} best_luck is not the largest share: {d}");
        // Ties go to the earliest share.
        let first_max = p.claims.iter().find(|(_, a)| *a == max).map(|(u, _)| u.as_str());
        assert_eq!(best["user"].as_str(), first_max, "packet {id} best_luck user: {d}");
    } else {
        assert_eq!(p.status, "active", "packet {id} with shares left: {d}");
        assert_eq!(int(d, "remaining_amount"), p.total - p.paid(), "packet {id} remaining_amount: {d}");
        assert!(d["best_luck"].is_null(), "packet {id} has best_luck before it is fully opened: {d}");
    }
    p
}

/// What each user was paid, summed over the given packets' claims lists.
pub fn paid_by_user(packets: &[PacketView]) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for p in packets {
        for (u, a) in &p.claims {
            *m.entry(u.clone()).or_insert(0) += a;
        }
    }
    m
}

/// Fetches many balances at once, `width` requests at a time.
pub async fn balances(api: &Api, users: &[String], width: usize) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for chunk in users.chunks(width) {
        let mut tasks = Vec::new();
        for u in chunk {
            let api = api.clone();
            let u = u.clone();
            tasks.push(tokio::spawn(async move {
                let b = api.balance(&u).await;
                (u, b)
            }));
        }
        for t in tasks {
            let (u, b) = t.await.expect("balance task");
            out.insert(u, b);
        }
    }
    out
}

/// The seed of a randomised test: `HONGBAO_TEST_SEED` or a fresh one, printed to replay.
pub fn seed(test: &str) -> u64 {
    let seed =
        std::env::var("HONGBAO_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("{test}: seed {seed} (HONGBAO_TEST_SEED={seed} replays it)");
    seed
}
