//! Arbitrary bytes read as the JSON forms the HTTP API and the CLI share: `QueueJson`,
//! `MessageJson` (with its `DeathJson`s) and `AuditJson`.
//!
//! The HTTP API's own parameter parsers (durations, counts) are private to the broker crate, and
//! widening their visibility for a fuzzer would put test needs into the broker's public API. What
//! untrusted bytes reach through public code is this JSON layer: request and response bodies,
//! and the CLI reading `--json` output back. Nothing may panic, and whatever parses writes back
//! to JSON that parses to an equal value, message ids (written as strings) included.

#![no_main]

use hopper_proto::json::{AuditJson, DeathJson, MessageJson, QueueJson};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    round_trip::<QueueJson>(data);
    round_trip::<MessageJson>(data);
    round_trip::<DeathJson>(data);
    round_trip::<AuditJson>(data);
});

/// Parses `data` as a `T`; if it parses, checks that it survives being written and read back.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<T>(data) else { return };
    let text = serde_json::to_string(&value).expect("a parsed value serializes");
    let again: T = serde_json::from_str(&text).expect("serialized JSON parses");
    assert_eq!(again, value, "round trip through {text}");
    let pretty = serde_json::to_vec_pretty(&value).expect("a parsed value serializes");
    assert_eq!(serde_json::from_slice::<T>(&pretty).expect("pretty JSON parses"), value);
}
