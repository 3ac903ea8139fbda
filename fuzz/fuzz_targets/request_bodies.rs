//! Arbitrary bytes through the API's request body types (`StrictJson` of `MoneyBody`,
//! `SendBody`, `UserBody`): parsing never panics, and a body it accepts is one JSON object and
//! nothing else, with an object for `audience` (serde's derive would also take an array of the
//! fields in order: this target found that). The first byte picks the body type.

#![no_main]

use hongbao_api::fuzz_parse_body;
use libfuzzer_sys::fuzz_target;

const KINDS: [&str; 3] = ["money", "send", "user"];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let kind = KINDS[usize::from(pick) % KINDS.len()];
    match fuzz_parse_body(kind, body) {
        Ok(()) => {
            let value: serde_json::Value =
                serde_json::from_slice(body).expect("an accepted body is valid JSON");
            assert!(value.is_object(), "accepted a {kind} body that is not an object: {value}");
            if kind == "send" {
                assert!(value["audience"].is_object(), "accepted an audience that is not an object: {value}");
            }
        }
        Err(detail) => assert!(!detail.is_empty(), "a refusal without a detail"),
    }
});
