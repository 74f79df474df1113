//! Arbitrary bytes into the hyperstart ctl decoder: never a panic; every
//! message decoded re-encodes to exactly the bytes it came from.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proxy_proto::hyper::ctl::CtlDecoder;
use proxy_proto::hyper::MAX_MESSAGE_LEN;

fuzz_target!(|data: &[u8]| {
    let mut src = BytesMut::from(data);
    let mut dec = CtlDecoder::new(MAX_MESSAGE_LEN);
    let mut consumed = 0;
    while let Ok(Some(m)) = dec.decode(&mut src) {
        let _ = m.code().map(|c| (c.name(), c.accepted_in_hyper()));
        let mut out = BytesMut::new();
        m.encode(&mut out, MAX_MESSAGE_LEN)
            .expect("a decoded message fits");
        assert_eq!(&out[..], &data[consumed..consumed + out.len()]);
        consumed += out.len();
    }
    assert_eq!(consumed + src.len(), data.len());
});
