//! Arbitrary command data through relocation: never a panic, and a
//! relocated command carries the session's seqs and parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_proto::hyper::ctl::Code;
use proxy_proto::hyper::relocate::{container_id, relocate};

fuzz_target!(|data: &[u8]| {
    let Some((&knob, json)) = data.split_first() else {
        return;
    };
    let code = Code::ALL[usize::from(knob) % Code::ALL.len()];
    // Mostly ordinary bases, sometimes the extremes.
    let io_base = match knob >> 5 {
        0 => u64::MAX,
        1 => u64::MAX - 1,
        n => u64::from(n) * 2 + 1,
    };
    let _ = container_id(json);
    if let Ok(r) = relocate(code, json, io_base) {
        let v: serde_json::Value = serde_json::from_slice(&r.data).expect("relocated data is JSON");
        assert_eq!(v["process"]["stdio"].as_u64(), Some(io_base));
        if code == Code::NewContainer {
            assert!(r.container_id.is_some());
        }
    }
});
