//! The daemon reaches the agent over any transport: the same scenario with
//! the agent's channels as plain unix sockets and as hybrid vsock
//! (`hvsock://path:port`, the CONNECT/OK handshake of Firecracker, Cloud
//! Hypervisor and vhost-device-vsock).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use proxy_proto::hyper::ctl::{Code, CtlDecoder, CtlMessage};
use proxy_proto::hyper::io::{IoDecoder, IoMessage};
use proxy_proto::hyper::MAX_MESSAGE_LEN;
use proxy_proto::{Command as Cmd, Frame, FrameDecoder, FrameKind, Limits, Notification, Stream};
use proxy_vsock::HybridListener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const BIN: &str = env!("CARGO_BIN_EXE_cc-proxy");

struct Proxy {
    child: Child,
    sock: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ccp-tr-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn start_proxy(dir: &Path) -> Proxy {
    let sock = dir.join("proxy.sock");
    let child = Command::new(BIN)
        .args([
            "-socket-path",
            sock.to_str().unwrap(),
            "-ksm",
            "initial",
            "-log",
            "debug",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proxy { child, sock };
    for _ in 0..500 {
        if UnixStream::connect(&p.sock).await.is_ok() {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("cc-proxy did not start");
}

struct Client {
    s: UnixStream,
    buf: BytesMut,
    dec: FrameDecoder,
}

impl Client {
    async fn connect(p: &Proxy) -> Client {
        Client {
            s: UnixStream::connect(&p.sock).await.unwrap(),
            buf: BytesMut::new(),
            dec: FrameDecoder::new(Limits::default()),
        }
    }
    async fn send(&mut self, f: Frame) {
        self.s.write_all(&f.to_bytes()).await.unwrap();
    }
    async fn recv(&mut self) -> Frame {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                return f;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read_buf(&mut self.buf))
                .await
                .expect("frame within 10s")
                .unwrap();
            assert!(n > 0, "proxy closed the connection");
        }
    }
    async fn call(&mut self, c: Cmd, payload: &str) -> Frame {
        self.send(Frame::command(c, payload.as_bytes().to_vec()))
            .await;
        let f = self.recv().await;
        assert_eq!(
            f.kind,
            FrameKind::Response {
                command: c,
                error: false
            },
            "{f:?}"
        );
        f
    }
}

/// The agent side of a connected pair of channels.
async fn agent(mut ctl: UnixStream, mut io: UnixStream) {
    let mut b = BytesMut::new();
    CtlMessage::new(Code::Ready, Vec::new())
        .encode(&mut b, MAX_MESSAGE_LEN)
        .unwrap();
    ctl.write_all(&b).await.unwrap();
    // io: echo stdin on stdout, then EOF + exit code 5 after stdin EOF.
    tokio::spawn(async move {
        let mut dec = IoDecoder::new(MAX_MESSAGE_LEN);
        let mut buf = BytesMut::new();
        loop {
            while let Some(m) = dec.decode(&mut buf).unwrap() {
                let mut out = BytesMut::new();
                if m.data.is_empty() {
                    IoMessage::new(m.seq, Vec::new())
                        .encode(&mut out, MAX_MESSAGE_LEN)
                        .unwrap();
                    IoMessage::new(m.seq, vec![5])
                        .encode(&mut out, MAX_MESSAGE_LEN)
                        .unwrap();
                } else {
                    IoMessage::new(m.seq, m.data)
                        .encode(&mut out, MAX_MESSAGE_LEN)
                        .unwrap();
                }
                io.write_all(&out).await.unwrap();
            }
            if io.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
    });
    let mut dec = CtlDecoder::new(MAX_MESSAGE_LEN);
    let mut buf = BytesMut::new();
    loop {
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            let mut out = BytesMut::new();
            CtlMessage::new(Code::Ack, m.payload)
                .encode(&mut out, MAX_MESSAGE_LEN)
                .unwrap();
            ctl.write_all(&out).await.unwrap();
        }
        if ctl.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
    }
}

async fn scenario(p: &Proxy, ctl: &str, io: &str) {
    let mut rt = Client::connect(p).await;
    let reg = rt
        .call(
            Cmd::RegisterVm,
            &format!(
                r#"{{"containerId":"vm","ctlSerial":"{ctl}","ioSerial":"{io}","numIOStreams":1}}"#
            ),
        )
        .await;
    let v: serde_json::Value = serde_json::from_slice(&reg.payload).unwrap();
    let token = v["io"]["tokens"][0].as_str().unwrap().to_owned();
    let mut shim = Client::connect(p).await;
    shim.call(Cmd::ConnectShim, &format!(r#"{{"token":"{token}"}}"#))
        .await;
    let ack = rt
        .call(
            Cmd::Hyper,
            &format!(
                r#"{{"hyperName":"execcmd","tokens":["{token}"],"data":{{"container":"c","process":{{"args":["cat"]}}}}}}"#
            ),
        )
        .await;
    assert_eq!(
        &ack.payload[..],
        br#"{"container":"c","process":{"args":["cat"],"stdio":3,"stderr":4}}"#
    );
    shim.send(Frame::stream(Stream::Stdin, b"ping".to_vec()))
        .await;
    let out = shim.recv().await;
    assert_eq!(
        (out.kind, &out.payload[..]),
        (FrameKind::Stream(Stream::Stdout), &b"ping"[..])
    );
    shim.send(Frame::stream(Stream::Stdin, Vec::new())).await;
    let exit = shim.recv().await;
    assert_eq!(
        exit.kind,
        FrameKind::Notification(Notification::ProcessExited)
    );
    assert_eq!(&exit.payload[..], &[5]);
    rt.call(Cmd::UnregisterVm, r#"{"containerId":"vm"}"#).await;
}

#[tokio::test]
async fn agent_over_unix_sockets() {
    let d = tempdir("unix");
    let p = start_proxy(&d).await;
    let ctl_l = UnixListener::bind(d.join("ctl.sock")).unwrap();
    let io_l = UnixListener::bind(d.join("io.sock")).unwrap();
    tokio::spawn(async move {
        let (ctl, _) = ctl_l.accept().await.unwrap();
        let (io, _) = io_l.accept().await.unwrap();
        agent(ctl, io).await;
    });
    let ctl = format!("unix://{}", d.join("ctl.sock").display());
    let io = d.join("io.sock").display().to_string();
    scenario(&p, &ctl, &io).await;
}

#[tokio::test]
async fn agent_over_hybrid_vsock() {
    let d = tempdir("hvsock");
    let p = start_proxy(&d).await;
    // One hybrid socket, two ports: as vhost-device-vsock serves a guest.
    let vsock = d.join("vsock.sock");
    let l = HybridListener::bind_any(&vsock).unwrap();
    tokio::spawn(async move {
        let mut ctl = None;
        let mut io = None;
        while ctl.is_none() || io.is_none() {
            let (s, port) = l.accept().await.unwrap();
            match port {
                1024 => ctl = Some(s),
                1025 => io = Some(s),
                other => panic!("unexpected port {other}"),
            }
        }
        agent(ctl.unwrap(), io.unwrap()).await;
    });
    let ctl = format!("hvsock://{}:1024", vsock.display());
    let io = format!("hvsock://{}:1025", vsock.display());
    scenario(&p, &ctl, &io).await;
}

#[tokio::test]
async fn a_bad_agent_address_is_a_clear_error() {
    let d = tempdir("badaddr");
    let p = start_proxy(&d).await;
    let mut rt = Client::connect(&p).await;
    rt.send(Frame::command(
        Cmd::RegisterVm,
        br#"{"containerId":"vm","ctlSerial":"vsock://x:1","ioSerial":"/nope"}"#.to_vec(),
    ))
    .await;
    let f = rt.recv().await;
    assert_eq!(
        f.kind,
        FrameKind::Response {
            command: Cmd::RegisterVm,
            error: true
        }
    );
    let msg = String::from_utf8_lossy(&f.payload).to_string();
    assert!(msg.contains("ctl address") && msg.contains("cid"), "{msg}");
}

#[tokio::test]
async fn pod_mode_serves_one_vm_and_exits_after_unregister() {
    let d = tempdir("pod");
    let sock = d.join("pod.sock");
    let child = Command::new(BIN)
        .args([
            "-uri",
            &format!("unix://{}", sock.display()),
            "-ksm",
            "initial",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut p = Proxy { child, sock };
    for _ in 0..500 {
        if UnixStream::connect(&p.sock).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ctl_l = UnixListener::bind(d.join("ctl.sock")).unwrap();
    let io_l = UnixListener::bind(d.join("io.sock")).unwrap();
    tokio::spawn(async move {
        let (ctl, _) = ctl_l.accept().await.unwrap();
        let (io, _) = io_l.accept().await.unwrap();
        agent(ctl, io).await;
    });
    let ctl = d.join("ctl.sock").display().to_string();
    let io = d.join("io.sock").display().to_string();
    scenario(&p, &ctl, &io).await;
    let mut status = None;
    for _ in 0..500 {
        if let Some(st) = p.child.try_wait().unwrap() {
            status = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = status.expect("pod-mode proxy exits after UnregisterVM");
    assert!(status.success(), "{status}");
    assert!(!p.sock.exists(), "socket removed");
}
