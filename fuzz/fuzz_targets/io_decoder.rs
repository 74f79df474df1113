//! Arbitrary bytes into the hyperstart io decoder: never a panic; every
//! message decoded re-encodes to exactly the bytes it came from, and
//! splitting its data again yields messages the decoder reads back.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proxy_proto::hyper::io::{encode_split, IoDecoder};
use proxy_proto::hyper::MAX_MESSAGE_LEN;

fuzz_target!(|data: &[u8]| {
    let mut src = BytesMut::from(data);
    let mut dec = IoDecoder::new(MAX_MESSAGE_LEN);
    let mut consumed = 0;
    while let Ok(Some(m)) = dec.decode(&mut src) {
        let mut out = BytesMut::new();
        m.encode(&mut out, MAX_MESSAGE_LEN)
            .expect("a decoded message fits");
        assert_eq!(&out[..], &data[consumed..consumed + out.len()]);
        consumed += out.len();

        // Re-split into small messages and read them back.
        let mut split = BytesMut::new();
        let n = encode_split(m.seq, &m.data, &mut split, 13 + m.data.len() % 64);
        let mut back = Vec::new();
        let mut count = 0;
        while let Some(p) = dec.decode(&mut split).expect("split messages are valid") {
            assert_eq!(p.seq, m.seq);
            back.extend_from_slice(&p.data);
            count += 1;
        }
        assert_eq!((count, &back[..]), (n, &m.data[..]));
    }
    assert_eq!(consumed + src.len(), data.len());
});
