//! Hostile input, field by field, against the real binary: every field of every request body
//! sent as each wrong JSON type, out of range, and missing; unknown and duplicate fields;
//! bodies that are not one JSON object; wrong content types. Each one must be a 400
//! `invalid_request` problem, never a 5xx, and move no money. Then the untouched valid bodies,
//! with the same request ids, must still succeed: a refused request claims no request id.

mod support;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;

/// What a JSON value is, as far as a field's type goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Json {
    Str,
    Int,
    Float,
    Bool,
    Null,
    StrList,
    OtherList,
    Object,
}

/// One value of each JSON type, written as JSON.
const WRONG_TYPES: &[(&str, Json)] = &[
    (r#""x""#, Json::Str),
    (r#""100""#, Json::Str),
    (r#""""#, Json::Str),
    ("1", Json::Int),
    ("-1", Json::Int),
    ("1.5", Json::Float),
    ("1.0", Json::Float),
    ("1e3", Json::Float),
    ("true", Json::Bool),
    ("false", Json::Bool),
    ("null", Json::Null),
    ("[]", Json::StrList),
    (r#"["ivy"]"#, Json::StrList),
    (r#"[1, "ivy"]"#, Json::OtherList),
    ("[null]", Json::OtherList),
    (r#"[["ivy"]]"#, Json::OtherList),
    ("{}", Json::Object),
    (r#"{"users": ["ivy"]}"#, Json::Object),
];

/// Integers every integer field refuses, and number spellings JSON or `i64` refuse.
const BAD_INTEGERS: &[&str] = &[
    "-1",
    "0",
    "-0",
    "-9223372036854775808",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551616",
    "1e30",
    "-1e30",
    "1e400",
    "0.0",
    "01",
    "+1",
    "0x10",
    "1_000",
    "NaN",
    "Infinity",
];

/// A field of a body: where it sits, its type, whether it must be there, and values of its
/// own type that the server must refuse.
struct Field {
    path: &'static [&'static str],
    ty: Json,
    required: bool,
    out_of_range: Vec<String>,
}

impl Field {
    fn new(path: &'static [&'static str], ty: Json, required: bool, out_of_range: Vec<String>) -> Field {
        Field { path, ty, required, out_of_range }
    }
}

/// An endpoint with a body, a body it accepts, and that body's fields.
struct Endpoint {
    name: &'static str,
    path: String,
    key: &'static str,
    base: Value,
    fields: Vec<Field>,
}

/// One hostile request.
struct Case {
    what: String,
    path: String,
    key: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

/// Stands in for a raw JSON fragment while a body is a `Value`; replaced after serialising.
const RAW: &str = "\u{1}raw\u{1}";

/// `base` with the field at `path` set to the raw JSON `raw`, or removed when `None`.
fn with_raw(base: &Value, path: &[&str], raw: Option<&str>) -> Vec<u8> {
    let mut body = base.clone();
    let (last, parents) = path.split_last().expect("a field path");
    let mut obj = &mut body;
    for p in parents {
        obj = &mut obj[*p];
    }
    let obj = obj.as_object_mut().expect("a field's parent is an object");
    match raw {
        None => {
            obj.remove(*last).expect("the base body has the field");
        }
        Some(_) => {
            obj.insert(last.to_string(), json!(RAW));
        }
    }
    let text = serde_json::to_string(&body).expect("serialise body");
    let sentinel = serde_json::to_string(RAW).expect("serialise sentinel");
    text.replacen(&sentinel, raw.unwrap_or(""), 1).into_bytes()
}

/// JSON string literals, for string fields.
fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| serde_json::to_string(s).expect("serialise string")).collect()
}

fn integers(extra: &[&str]) -> Vec<String> {
    BAD_INTEGERS.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// Strings no id accepts: empty, spaces, slashes, non-ASCII, control characters, too long.
fn bad_id_strings(len_max: usize) -> Vec<String> {
    let too_long = "x".repeat(len_max + 1);
    let huge = "x".repeat(100_000);
    let mut v = strings(&[
        "",
        " ",
        "a b",
        "ä",
        "用户",
        "😀",
        "\0",
        "a\nb",
        "\u{202e}abc",
        "x\u{7f}",
        &too_long,
        &huge,
    ]);
    // A lone surrogate is not a Unicode scalar: JSON's decoder refuses the escape.
    v.push(r#""\ud800""#.to_string());
    v
}

fn user_strings() -> Vec<String> {
    let mut v = bad_id_strings(64);
    v.extend(strings(&["a/b", "../etc", "a%20b", "a:b"]));
    v
}

fn endpoints(packet: &str) -> Vec<Endpoint> {
    use Json::*;
    let request_id = || Field::new(&["request_id"], Str, true, bad_id_strings(128));
    let amount = || Field::new(&["amount"], Int, true, integers(&["1000000000001"]));
    let transfer = |name, path: &str, key, rid| Endpoint {
        name,
        path: path.to_string(),
        key,
        base: json!({"amount": 500, "request_id": rid}),
        fields: vec![amount(), request_id()],
    };
    let many_users: Vec<String> = (0..10_001).map(|i| format!("u{i}")).collect();
    let bad_members: Vec<String> = user_strings().into_iter().map(|u| format!(r#"["ivy", {u}]"#)).collect();
    let group = Endpoint {
        name: "send to a group",
        path: "/v1/packets".into(),
        key: API_KEY,
        base: json!({
            "sender": "hank", "kind": "lucky", "total_amount": 1_000, "count": 2,
            "audience": {"users": ["ivy", "jon"]}, "greeting": "恭喜发财", "expires_in_s": 3_600,
            "request_id": "hostile-send-group",
        }),
        fields: vec![
            Field::new(&["sender"], Str, true, user_strings()),
            Field::new(
                &["kind"],
                Str,
                true,
                strings(&["", "LUCKY", " lucky", "lucky\0", "幸运", "random", &"x".repeat(100_000)]),
            ),
            Field::new(&["total_amount"], Int, true, integers(&["1", "10000000001"])),
            Field::new(&["count"], Int, true, integers(&["3", "100001", "4294967295", "4294967296"])),
            Field::new(
                &["audience"],
                Object,
                true,
                [
                    "{}",
                    r#"{"anyone": false}"#,
                    r#"{"users": ["ivy", "jon"], "anyone": true}"#,
                    r#"{"users": ["ivy", "jon"], "anyone": false}"#,
                    r#"{"users": null, "anyone": null}"#,
                ]
                .map(String::from)
                .into(),
            ),
            Field::new(&["audience", "users"], StrList, true, {
                let mut v = vec!["[]".to_string(), r#"["ivy"]"#.into(), r#"["ivy", "ivy"]"#.into()];
                v.push(serde_json::to_string(&many_users).expect("serialise users"));
                v.extend(bad_members);
                v
            }),
            Field::new(
                &["greeting"],
                Str,
                false,
                strings(&[&"x".repeat(257), &"福".repeat(257), &"😀".repeat(257), &"x".repeat(2 << 20)]),
            ),
            Field::new(&["expires_in_s"], Int, false, integers(&["604801", "86400000"])),
            request_id(),
        ],
    };
    let anyone = Endpoint {
        name: "send to anyone",
        path: "/v1/packets".into(),
        key: API_KEY,
        base: json!({
            "sender": "hank", "kind": "equal", "total_amount": 1_000, "count": 2,
            "audience": {"anyone": true}, "request_id": "hostile-send-anyone",
        }),
        fields: vec![
            Field::new(&["audience", "anyone"], Bool, true, vec!["false".into()]),
            Field::new(&["total_amount"], Int, true, integers(&["1001", "999"])),
        ],
    };
    let user = |name, verb, who| Endpoint {
        name,
        path: format!("/v1/packets/{packet}/{verb}"),
        key: API_KEY,
        base: json!({"user": who}),
        fields: vec![Field::new(&["user"], Str, true, user_strings())],
    };
    vec![
        transfer("deposit", "/v1/wallets/hank/deposit", ADMIN_KEY, "hostile-deposit"),
        transfer("withdraw", "/v1/wallets/hank/withdraw", API_KEY, "hostile-withdraw"),
        group,
        anyone,
        user("grab", "grab", "ivy"),
        user("open", "open", "ivy"),
        user("claim", "claim", "jon"),
    ]
}

/// Every field of every endpoint: each wrong type, each out-of-range value, and missing.
fn field_cases(endpoints: &[Endpoint]) -> Vec<Case> {
    let mut cases = Vec::new();
    for e in endpoints {
        let mut case = |what: String, body: Vec<u8>| {
            cases.push(Case { what, path: e.path.clone(), key: e.key, content_type: None, body })
        };
        for f in &e.fields {
            let field = f.path.join(".");
            for (raw, ty) in WRONG_TYPES {
                // Null on an optional field means absent, which is valid.
                let own_type = *ty == f.ty || (*ty == Json::Null && !f.required);
                if !own_type {
                    case(format!("{}: {field} = {raw}", e.name), with_raw(&e.base, f.path, Some(raw)));
                }
            }
            for raw in &f.out_of_range {
                let shown: String = raw.chars().take(60).collect();
                let what = format!("{}: {field} = {shown} ({} bytes)", e.name, raw.len());
                case(what, with_raw(&e.base, f.path, Some(raw)));
            }
            if f.required {
                case(format!("{}: {field} missing", e.name), with_raw(&e.base, f.path, None));
            }
        }
    }
    cases
}

/// Unknown and duplicate fields, bodies that are not one JSON object, wrong content types.
fn body_cases(endpoints: &[Endpoint]) -> Vec<Case> {
    let mut cases = Vec::new();
    for e in endpoints {
        let base = serde_json::to_string(&e.base).expect("serialise body");
        let inner = base.strip_prefix('{').expect("a body is an object");
        let fields: Vec<&str> = e.base.as_object().expect("an object").keys().map(String::as_str).collect();
        let positional: Vec<Value> = e.base.as_object().expect("an object").values().cloned().collect();
        let mut bodies: Vec<(String, Vec<u8>)> = vec![
            ("unknown field".into(), format!(r#"{{"extra": 1, {inner}"#).into_bytes()),
            ("unknown empty field name".into(), format!(r#"{{"": 1, {inner}"#).into_bytes()),
            ("unknown field __proto__".into(), format!(r#"{{"__proto__": {{}}, {inner}"#).into_bytes()),
            ("positional array of the fields".into(), serde_json::to_vec(&positional).expect("serialise")),
            ("empty object".into(), b"{}".to_vec()),
            ("empty body".into(), Vec::new()),
            ("whitespace body".into(), b" \n\t ".to_vec()),
            ("null".into(), b"null".to_vec()),
            ("true".into(), b"true".to_vec()),
            ("a number".into(), b"500".to_vec()),
            ("a string".into(), br#""ivy""#.to_vec()),
            ("an empty array".into(), b"[]".to_vec()),
            ("trailing garbage".into(), format!("{base} x").into_bytes()),
            ("two objects".into(), format!("{base}{base}").into_bytes()),
            ("truncated".into(), base.as_bytes()[..base.len() / 2].to_vec()),
            ("byte order mark".into(), format!("\u{feff}{base}").into_bytes()),
            ("single quotes".into(), base.replace('"', "'").into_bytes()),
            ("comment".into(), format!("/* c */{base}").into_bytes()),
            ("nested 100,000 deep".into(), format!(r#"{{"x": {}"#, "[".repeat(100_000)).into_bytes()),
            ("2 MiB of whitespace".into(), format!("{base}{}", " ".repeat(2 << 20)).into_bytes()),
        ];
        let mut invalid_utf8 = br#"{"x": ""#.to_vec();
        invalid_utf8.extend_from_slice(&[0xff, 0xfe, b'"', b'}']);
        bodies.push(("invalid UTF-8".into(), invalid_utf8));
        for f in &fields {
            let value = serde_json::to_string(&e.base[*f]).expect("serialise value");
            bodies.push((format!("duplicate {f}"), format!(r#"{{"{f}": {value}, {inner}"#).into_bytes()));
            let upper = f.to_uppercase();
            bodies.push((
                format!("field {upper}"),
                base.replacen(&format!(r#""{f}""#), &format!(r#""{upper}""#), 1).into_bytes(),
            ));
        }
        if e.base.get("audience").is_some() {
            for (what, audience) in [
                ("unknown audience field", r#"{"anyone": true, "extra": 1}"#),
                ("duplicate audience users", r#"{"users": ["ivy", "jon"], "users": ["ivy", "jon"]}"#),
                ("duplicate audience anyone", r#"{"anyone": true, "anyone": true}"#),
                ("positional audience", r#"[["ivy", "jon"], null]"#),
                ("positional audience anyone", "[null, true]"),
            ] {
                bodies.push((what.into(), with_raw(&e.base, &["audience"], Some(audience))));
            }
        }
        for (what, body) in bodies {
            cases.push(Case {
                what: format!("{}: {what}", e.name),
                path: e.path.clone(),
                key: e.key,
                content_type: None,
                body,
            });
        }
        for ct in ["text/plain", "application/jsonx", "application/x-www-form-urlencoded", ""] {
            cases.push(Case {
                what: format!("{}: content type {ct:?}", e.name),
                path: e.path.clone(),
                key: e.key,
                content_type: Some(ct),
                body: base.clone().into_bytes(),
            });
        }
    }
    cases
}

/// Sends each case and collects every reply that is not a 400 `invalid_request` problem.
///
/// A body over the size limit goes on a connection of its own: the server reads it to its end
/// (within a bound) before the 400, but one it leaves unread closes the connection, and a
/// pooled client's next request on that connection would fail with no answer.
async fn refusals(api: &Api, cases: Vec<Case>) -> Vec<String> {
    let unpooled = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .no_proxy()
        .build()
        .expect("cannot build the HTTP client");
    let mut wrong = Vec::new();
    for c in cases {
        let oversize = api.with_client(unpooled.clone());
        let api = if c.body.len() > hongbao_api::BODY_BYTES_MAX { &oversize } else { api };
        let r = match c.content_type {
            None => match api.try_raw(Method::POST, &c.path, Some(c.key), Some(c.body)).await {
                Ok(r) => r,
                Err(e) => {
                    wrong.push(format!("{} (POST {}): no answer: {e:?}", c.what, c.path));
                    continue;
                }
            },
            Some(ct) => {
                let mut req = api.client.post(api.url(&c.path)).bearer_auth(c.key).body(c.body);
                if !ct.is_empty() {
                    req = req.header("content-type", ct);
                }
                let resp = req.send().await.unwrap_or_else(|e| panic!("{}: no answer: {e}", c.what));
                let status = resp.status().as_u16();
                let content_type = resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let body = resp.json().await.unwrap_or(Value::Null);
                Reply { status, body, content_type, retry_after: None }
            }
        };
        let problem = r.content_type.starts_with("application/problem+json");
        if r.status != 400 || r.body["code"] != "invalid_request" || !problem {
            let body: String = r.body.to_string().chars().take(300).collect();
            wrong.push(format!("{} (POST {}): {} {} {body}", c.what, c.path, r.status, r.content_type));
        }
    }
    wrong
}

/// A server with money in one wallet and one group packet to grab, open and claim.
async fn arrange() -> (TestServer, String) {
    let server = TestServer::start(Opts::default()).await;
    server.deposit_ok("hank", 1_000_000).await;
    let id = server.send_ok("hank", "lucky", 1_000, 2, users(&["ivy", "jon"])).await;
    (server, id)
}

/// The valid bodies, each once, with the request ids the hostile cases used: each must do
/// what it says, so the refusals above were about the damage, and claimed no request id.
async fn valid_bodies_still_work(server: &TestServer, endpoints: &[Endpoint]) {
    for e in endpoints {
        let body = serde_json::to_vec(&e.base).expect("serialise body");
        let r = server.raw(Method::POST, &e.path, Some(e.key), Some(body)).await;
        let want = if e.path == "/v1/packets" { 201 } else { 200 };
        assert_eq!(r.status, want, "{}: the valid body {} was refused: {}", e.name, e.base, r.body);
        match e.name {
            "deposit" => assert_eq!(r.body["balance"], 1_000_000 - 1_000 + 500, "{}", r.body),
            "withdraw" => assert_eq!(r.body["balance"], 1_000_000 - 1_000, "{}", r.body),
            "grab" => assert_eq!(r.body["status"], "grabbed", "{}", r.body),
            _ => {}
        }
    }
    assert_audit_ok(&server.settle().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_of_the_wrong_type_out_of_range_or_missing_is_400_and_moves_nothing() {
    // Arrange.
    let (server, id) = arrange().await;
    let endpoints = endpoints(&id);
    let before = money(&server.settle().await);

    // Act.
    let cases = field_cases(&endpoints);
    let n = cases.len();
    let wrong = refusals(&server, cases).await;

    // Assert.
    assert!(
        wrong.is_empty(),
        "{} of {n} hostile fields were not a 400 invalid_request:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let after = server.settle().await;
    assert_eq!(money(&after), before, "hostile fields moved money: {after}");
    assert_eq!(server.balance("hank").await, 1_000_000 - 1_000);
    let details = server.packet_full(&id).await;
    assert_eq!((details["remaining_count"].as_i64(), &details["claims"]), (Some(2), &json!([])), "{details}");
    let (status, sent) = server.sent("hank", "").await;
    assert_eq!((status, sent["count"].as_i64()), (200, Some(1)), "hostile sends made packets: {sent}");
    println!("{n} hostile fields refused");
    valid_bodies_still_work(&server, &endpoints).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_duplicate_and_non_object_bodies_are_400_and_move_nothing() {
    // Arrange.
    let (server, id) = arrange().await;
    let endpoints = endpoints(&id);
    let before = money(&server.settle().await);

    // Act.
    let cases = body_cases(&endpoints);
    let n = cases.len();
    let wrong = refusals(&server, cases).await;

    // Assert.
    assert!(
        wrong.is_empty(),
        "{} of {n} hostile bodies were not a 400 invalid_request:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(money(&server.settle().await), before, "hostile bodies moved money");
    println!("{n} hostile bodies refused");
    valid_bodies_still_work(&server, &endpoints).await;
}

/// serde's derive takes a JSON array of a struct's fields in order, so `[500, "r1"]` once
/// deposited 500 fen and `["hank", "lucky", 1000, 2, [["ivy"], null], null, null, "r"]` sent
/// a packet. Found by the `request_bodies` fuzz target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_positional_fields_is_400_not_a_deposit() {
    let server = TestServer::start(Opts::default()).await;
    server.deposit_ok("hank", 1_000).await;

    let r = server
        .raw(Method::POST, "/v1/wallets/hank/deposit", Some(ADMIN_KEY), Some(br#"[500, "pos-1"]"#.to_vec()))
        .await;
    assert_problem_reply("positional deposit", &r, 400, "invalid_request");
    let send = br#"["hank", "lucky", 100, 1, [["ivy"], null], null, null, "pos-2"]"#.to_vec();
    let r = server.raw(Method::POST, "/v1/packets", Some(API_KEY), Some(send)).await;
    assert_problem_reply("positional send", &r, 400, "invalid_request");
    let send = json!({
        "sender": "hank", "kind": "lucky", "total_amount": 100, "count": 1,
        "audience": [["ivy"], null], "request_id": "pos-3",
    });
    let r = server.call(Method::POST, "/v1/packets", Some(API_KEY), Some(&send)).await;
    assert_problem_reply("positional audience", &r, 400, "invalid_request");

    assert_eq!(server.balance("hank").await, 1_000);
    assert_eq!(money(&server.settle().await), [1_000, 0, 1_000, 0, 0]);
}
