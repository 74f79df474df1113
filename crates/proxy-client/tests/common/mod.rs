//! Shared pieces of the client's tests: the real `cc-proxy` binary, a mock
//! agent registered through the library, and a relay whose connections the
//! test can cut (a proxy connection that drops).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use proxy_client::{Client, Token, VmSpec};
use proxy_test_support::hyper::Code;
use proxy_test_support::scenario::unique_id;
use proxy_test_support::{MockAgent, ProxyProcess, TempDir};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// The workspace's `cc-proxy`, built if need be: `target/<profile>/cc-proxy`
/// next to this test's own directory (`cargo test --workspace` builds it;
/// `cargo test -p proxy-client` alone gets it built here). `CC_PROXY_BIN`
/// overrides.
pub fn cc_proxy() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("CC_PROXY_BIN") {
            return p.into();
        }
        let exe = std::env::current_exe().expect("the test's own path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("tests run from target/<profile>/deps");
        let bin = profile_dir.join("cc-proxy");
        if !bin.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "proxy-server", "--bin", "cc-proxy"]);
            if profile_dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build for cc-proxy");
            assert!(status.success(), "cargo build of cc-proxy failed");
        }
        assert!(bin.exists(), "no cc-proxy at {}", bin.display());
        bin
    })
    .clone()
}

/// A started `cc-proxy`.
pub async fn proxy() -> ProxyProcess {
    ProxyProcess::start(cc_proxy()).await
}

/// A VM with a mock agent, registered through the library.
pub struct Vm {
    pub id: String,
    pub agent: MockAgent,
    pub client: Client,
    pub tokens: Vec<Token>,
    pub url: String,
}

impl Vm {
    pub async fn register(proxy: &ProxyProcess, tokens: u32) -> Vm {
        let agent = MockAgent::start().await;
        let client = Client::connect(proxy.socket_path()).await.unwrap();
        let id = unique_id("vm");
        let spec = VmSpec::new(
            &id,
            agent.ctl_path().display().to_string(),
            agent.io_path().display().to_string(),
        )
        .tokens(tokens);
        let io = client.register_vm(spec).await.unwrap();
        assert_eq!(io.url, proxy.url());
        assert_eq!(io.tokens.len(), tokens as usize);
        Vm {
            id,
            agent,
            client,
            tokens: io.tokens,
            url: io.url,
        }
    }

    /// `newcontainer` with `token` through the library while the agent
    /// checks and ACKs it; returns the relocated ioBase.
    pub async fn newcontainer(&mut self, container: &str, token: &Token) -> u64 {
        let data = proxy_test_support::scenario::newcontainer_data(container);
        let tokens = [token.clone()];
        let (reply, io_base) = tokio::join!(
            self.client.hyper("newcontainer", &tokens, Some(&data)),
            async {
                let v = self.agent.expect_ctl_json(Code::NewContainer).await;
                let io_base = v["process"]["stdio"].as_u64().unwrap();
                assert_eq!(v["process"]["stderr"].as_u64(), Some(io_base + 1));
                assert_eq!(v["id"], container);
                self.agent.reply_ack(b"").await;
                io_base
            }
        );
        reply.unwrap();
        io_base
    }
}

/// A unix-socket relay in front of the proxy: clients connect to
/// [`Relay::path`]; [`Relay::cut`] closes every connection made so far, as
/// a proxy connection that drops.
pub struct Relay {
    _dir: TempDir,
    path: PathBuf,
    conns: Arc<Mutex<Vec<Relayed>>>,
    accept: JoinHandle<()>,
    /// Connections accepted so far, and a wake-up for each.
    accepted: Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>,
    /// The proxy's ends of connections cut on the client's side only.
    held: Mutex<Vec<std::os::fd::OwnedFd>>,
}

/// One relayed connection: its task, and both of its sockets (duplicated
/// descriptors) so that a cut takes effect in the kernel at once.
struct Relayed {
    task: JoinHandle<()>,
    fds: [std::os::fd::OwnedFd; 2],
}

impl Relay {
    pub async fn start(target: &Path) -> Relay {
        let dir = TempDir::new();
        let path = dir.socket("relay.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let conns: Arc<Mutex<Vec<Relayed>>> = Arc::default();
        let accepted: Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)> = Arc::default();
        let target = target.to_owned();
        let accept = tokio::spawn({
            let conns = conns.clone();
            let accepted = accepted.clone();
            async move {
                use std::os::fd::AsFd;
                while let Ok((mut a, _)) = listener.accept().await {
                    let Ok(mut b) = UnixStream::connect(&target).await else {
                        continue;
                    };
                    let fds = [
                        a.as_fd().try_clone_to_owned().unwrap(),
                        b.as_fd().try_clone_to_owned().unwrap(),
                    ];
                    let task = tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    });
                    conns.lock().unwrap().push(Relayed { task, fds });
                    accepted.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    accepted.1.notify_waiters();
                }
            }
        });
        Relay {
            _dir: dir,
            path,
            conns,
            accept,
            accepted,
            held: Mutex::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Close every relayed connection (both sides) at once: both sockets
    /// are shut down in the kernel before this returns, so a byte sent
    /// afterwards cannot reach the old connection.
    pub async fn cut(&self) {
        let conns: Vec<Relayed> = self.conns.lock().unwrap().drain(..).collect();
        for c in conns {
            for fd in &c.fds {
                let _ = nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(fd),
                    nix::sys::socket::Shutdown::Both,
                );
            }
            c.task.abort();
            let _ = c.task.await;
        }
    }
}

impl Relay {
    /// Connections relayed so far.
    pub fn accepted(&self) -> usize {
        self.accepted.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait until at least `n` connections were relayed (a test that
    /// waits for an event; `timeout` fails it).
    pub async fn wait_accepted(&self, n: usize, timeout: std::time::Duration) {
        tokio::time::timeout(timeout, async {
            loop {
                let woken = self.accepted.1.notified();
                if self.accepted() >= n {
                    return;
                }
                woken.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} connections, not {n}", self.accepted()));
    }

    /// Cut every relayed connection on the client's side only: the client
    /// sees its connection die, while the proxy's end stays open (a dead
    /// peer the proxy has not noticed yet) until
    /// [`release_held`](Self::release_held).
    pub async fn cut_client_side(&self) {
        let conns: Vec<Relayed> = self.conns.lock().unwrap().drain(..).collect();
        for c in conns {
            let [client, proxy] = c.fds;
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&client),
                nix::sys::socket::Shutdown::Both,
            );
            c.task.abort();
            let _ = c.task.await;
            // The task's own descriptor is closed now; this duplicate keeps
            // the proxy's connection open.
            self.held.lock().unwrap().push(proxy);
        }
    }

    /// Close the proxy's ends kept by [`cut_client_side`](Self::cut_client_side).
    pub fn release_held(&self) {
        self.held.lock().unwrap().clear();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.task.abort();
        }
    }
}
