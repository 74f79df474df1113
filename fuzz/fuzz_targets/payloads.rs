//! Arbitrary bytes as every JSON payload type: never a panic, and a value
//! that parsed serializes and parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_proto::hyper::types;
use proxy_proto::payload::{
    AttachVm, ConnectShim, DisconnectShim, ErrorResponse, Hyper, LogEntry, RegisterVm,
    RegisterVmResponse, Signal, UnregisterVm,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn check<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(data).ok()?;
    let again = serde_json::to_vec(&v).expect("a parsed payload serializes");
    let back: T = serde_json::from_slice(&again).expect("what we write we read");
    assert_eq!(back, v);
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    if let Some(r) = check::<RegisterVm>(data) {
        let _ = r.validate();
    }
    if let Some(r) = check::<UnregisterVm>(data) {
        let _ = r.validate();
    }
    if let Some(r) = check::<AttachVm>(data) {
        let _ = r.validate();
    }
    if let Some(h) = check::<Hyper>(data) {
        let _ = h.validate();
        let _ = h.data_bytes();
    }
    if let Some(c) = check::<ConnectShim>(data) {
        let _ = c.validate();
    }
    check::<DisconnectShim>(data);
    check::<Signal>(data);
    check::<RegisterVmResponse>(data);
    check::<ErrorResponse>(data);
    check::<LogEntry>(data);
    check::<types::Container>(data);
    check::<types::ExecCommand>(data);
    check::<types::KillCommand>(data);
    check::<types::WindowSize>(data);
    check::<types::RemoveContainer>(data);
});
