//! The mocks against hand-written peers: the agent against a fake proxy,
//! the client against a fake daemon socket.

use std::time::Duration;

use bytes::BytesMut;
use proxy_proto::hyper::ctl::{Code, CtlDecoder, CtlMessage};
use proxy_proto::hyper::io::{IoDecoder, IoMessage};
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use proxy_proto::{Command, Frame, FrameDecoder, Stream};
use proxy_test_support::{AutoReply, MockAgent, MockClient, ReadyMode, Recv, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

async fn read_ctl(s: &mut UnixStream, buf: &mut BytesMut) -> CtlMessage {
    loop {
        if let Some(m) = CtlDecoder::default().decode(buf).unwrap() {
            return m;
        }
        assert!(s.read_buf(buf).await.unwrap() > 0, "agent closed ctl");
    }
}

async fn write_ctl(s: &mut UnixStream, code: Code, payload: &[u8]) {
    let mut b = BytesMut::new();
    CtlMessage::new(code, payload.to_vec())
        .encode(&mut b, MAX_MESSAGE_LEN)
        .unwrap();
    s.write_all(&b).await.unwrap();
}

#[tokio::test]
async fn agent_speaks_hyperstart() {
    let mut agent = MockAgent::start().await;
    let mut ctl = UnixStream::connect(agent.ctl_path()).await.unwrap();
    let mut io = UnixStream::connect(agent.io_path()).await.unwrap();
    let mut cbuf = BytesMut::new();
    assert_eq!(
        read_ctl(&mut ctl, &mut cbuf).await.code(),
        Some(Code::Ready)
    );

    write_ctl(&mut ctl, Code::Ping, b"{}").await;
    let m = agent.expect_ctl("ping").await;
    assert_eq!(&m.payload[..], b"{}");
    agent.reply_ack(b"pong").await;
    let r = read_ctl(&mut ctl, &mut cbuf).await;
    assert_eq!((r.code(), &r.payload[..]), (Some(Code::Ack), &b"pong"[..]));

    // io: a large send is split into messages of at most 10240 bytes.
    agent.send_io(3, vec![7u8; 25_000]).await;
    let mut ibuf = BytesMut::new();
    let mut got = 0;
    while got < 25_000 {
        match IoDecoder::default().decode(&mut ibuf).unwrap() {
            Some(m) => {
                assert_eq!(m.seq, 3);
                assert!(m.encoded_len() <= MAX_MESSAGE_LEN);
                got += m.data.len();
            }
            None => assert!(io.read_buf(&mut ibuf).await.unwrap() > 0),
        }
    }
    let mut b = BytesMut::new();
    IoMessage::new(5, b"abc".to_vec())
        .encode(&mut b, MAX_MESSAGE_LEN)
        .unwrap();
    IoMessage::new(5, b"de".to_vec())
        .encode(&mut b, MAX_MESSAGE_LEN)
        .unwrap();
    IoMessage::new(5, Vec::new())
        .encode(&mut b, MAX_MESSAGE_LEN)
        .unwrap();
    io.write_all(&b).await.unwrap();
    assert_eq!(&agent.read_io_until(5, 5).await[..], b"abcde");
    agent.expect_io_eof(5).await;

    drop(ctl);
    assert!(agent.expect_ctl_closed().await.is_empty());
}

#[tokio::test]
#[should_panic(expected = "expected ctl `newcontainer`, got `ping` (12)")]
async fn expect_ctl_names_what_came() {
    let mut agent = MockAgent::start().await;
    let mut ctl = UnixStream::connect(agent.ctl_path()).await.unwrap();
    let _io = UnixStream::connect(agent.io_path()).await.unwrap();
    write_ctl(&mut ctl, Code::Ping, b"").await;
    agent.expect_ctl(Code::NewContainer).await;
}

#[tokio::test]
#[should_panic(expected = "got nothing within 100ms")]
async fn expect_ctl_times_out() {
    let mut agent = MockAgent::builder()
        .timeout(Duration::from_millis(100))
        .start()
        .await;
    let _ctl = UnixStream::connect(agent.ctl_path()).await.unwrap();
    let _io = UnixStream::connect(agent.io_path()).await.unwrap();
    agent.expect_ctl("version").await;
}

#[tokio::test]
async fn manual_ready_and_close_on_connect() {
    let mut agent = MockAgent::builder().ready(ReadyMode::Manual).start().await;
    let mut ctl = UnixStream::connect(agent.ctl_path()).await.unwrap();
    let _io = UnixStream::connect(agent.io_path()).await.unwrap();
    let mut one = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), ctl.read(&mut one))
            .await
            .is_err(),
        "nothing before send_ready"
    );
    agent.send_ready().await;
    let mut buf = BytesMut::new();
    assert_eq!(read_ctl(&mut ctl, &mut buf).await.code(), Some(Code::Ready));

    let agent = MockAgent::builder()
        .ready(ReadyMode::CloseOnConnect)
        .start()
        .await;
    let mut ctl = UnixStream::connect(agent.ctl_path()).await.unwrap();
    let _io = UnixStream::connect(agent.io_path()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), ctl.read(&mut one))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without READY");
}

#[tokio::test]
async fn auto_responder_records_and_echoes() {
    let mut agent = MockAgent::start().await;
    let mut ctl = UnixStream::connect(agent.ctl_path()).await.unwrap();
    let _io = UnixStream::connect(agent.io_path()).await.unwrap();
    let auto = agent.auto_respond(AutoReply::Echo).await;
    let mut buf = BytesMut::new();
    assert_eq!(read_ctl(&mut ctl, &mut buf).await.code(), Some(Code::Ready));
    for i in 0..10 {
        write_ctl(&mut ctl, Code::Ping, format!("{i}").as_bytes()).await;
        let r = read_ctl(&mut ctl, &mut buf).await;
        assert_eq!(r.code(), Some(Code::Ack));
        assert_eq!(r.payload, format!("{i}").as_bytes());
    }
    assert_eq!(auto.wait_for(10, Duration::from_secs(5)).await.len(), 10);
}

#[tokio::test]
async fn client_reassembles_and_keeps_unrelated_frames() {
    let dir = TempDir::new();
    let path = dir.socket("p.sock");
    let l = UnixListener::bind(&path).unwrap();
    let mut client = MockClient::connect(&path).await;
    let (mut peer, _) = l.accept().await.unwrap();

    client.stdin(&b"x"[..]).await;
    let mut buf = BytesMut::new();
    let f = loop {
        if let Some(f) = FrameDecoder::default().decode(&mut buf).unwrap() {
            break f;
        }
        peer.read_buf(&mut buf).await.unwrap();
    };
    assert_eq!(f, Frame::stream(Stream::Stdin, &b"x"[..]));

    // Output before the response is kept, in order, across frame bounds.
    let mut wire = BytesMut::new();
    Frame::stream(Stream::Stdout, &b"hel"[..]).encode(&mut wire);
    Frame::stream(Stream::Stdout, &b"lo world"[..]).encode(&mut wire);
    Frame::error_response(Command::Signal, "bad signal").encode(&mut wire);
    Frame::process_exited(9).encode(&mut wire);
    for chunk in wire.chunks(5) {
        peer.write_all(chunk).await.unwrap();
    }
    assert_eq!(client.signal(99, 0, 0).await.unwrap_err(), "bad signal");
    assert_eq!(&client.expect_stdout(5).await[..], b"hello");
    assert_eq!(&client.expect_stdout(6).await[..], b" world");
    assert_eq!(client.expect_exit().await, 9);
    drop(peer);
    assert!(client.expect_closed().await.is_empty());
    assert_eq!(
        client.recv_within(Duration::from_millis(10)).await,
        Recv::Closed
    );
}
