//! Ready-made steps of the protocol: a registered VM, a started container
//! with its shim, and the end-to-end check that the daemon still serves.

use std::sync::atomic::{AtomicU64, Ordering};

use proxy_proto::hyper::ctl::Code;

use crate::{MockAgent, MockClient, ProxyProcess};

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A container id unique in this test process: `<prefix>-<pid>-<n>`.
pub fn unique_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// `newcontainer` data for container `id`, with `stdio` and `stderr` left
/// at 0 for the proxy to relocate.
pub fn newcontainer_data(id: &str) -> String {
    serde_json::json!({
        "id": id,
        "rootfs": "rootfs",
        "image": "busybox",
        "process": {
            "terminal": false,
            "stdio": 0,
            "stderr": 0,
            "args": ["sh", "-c", "cat"],
            "envs": [{"env": "PATH", "value": "/bin"}],
            "workdir": "/"
        }
    })
    .to_string()
}

/// A VM registered with a healthy [`MockAgent`], and the runtime client
/// that registered it.
#[derive(Debug)]
pub struct Vm {
    /// The VM's containerId.
    pub id: String,
    /// Its agent.
    pub agent: MockAgent,
    /// The runtime connection that registered it (attached to the VM).
    pub runtime: MockClient,
    /// The tokens RegisterVM allocated.
    pub tokens: Vec<String>,
}

/// A container started with a token, and the shim that claimed it.
#[derive(Debug)]
pub struct Container {
    /// The container id given to `newcontainer`.
    pub id: String,
    /// The token.
    pub token: String,
    /// The session's ioBase (stdin/stdout; stderr is `io_base + 1`), as the
    /// proxy relocated it.
    pub io_base: u64,
    /// The shim connection.
    pub shim: MockClient,
}

impl Vm {
    /// Start an agent and register it with `num_io_streams` tokens.
    ///
    /// # Panics
    ///
    /// If RegisterVM fails or its response is not as the spec says.
    pub async fn register(proxy: &ProxyProcess, num_io_streams: u32) -> Self {
        let agent = MockAgent::start().await;
        let mut runtime = proxy.client().await;
        let id = unique_id("vm");
        let io = runtime
            .register_agent(&id, &agent, num_io_streams)
            .await
            .unwrap_or_else(|e| panic!("RegisterVM {id}: {e}"));
        assert_eq!(io.url, proxy.url(), "RegisterVM's io.URL");
        assert_eq!(
            io.tokens.len(),
            num_io_streams as usize,
            "RegisterVM's io.tokens: {:?}",
            io.tokens
        );
        Self {
            id,
            agent,
            runtime,
            tokens: io.tokens,
        }
    }

    /// Connect a shim with `token`, then run `newcontainer` with that token
    /// (the agent checks the relocation and ACKs).
    ///
    /// # Panics
    ///
    /// If any step fails.
    pub async fn start_container(&mut self, proxy: &ProxyProcess, token: &str) -> Container {
        let mut shim = proxy.client().await;
        shim.connect_shim(token)
            .await
            .unwrap_or_else(|e| panic!("ConnectShim {token}: {e}"));
        let id = unique_id("c");
        let io_base = self.newcontainer(&id, token).await;
        Container {
            id,
            token: token.to_owned(),
            io_base,
            shim,
        }
    }

    /// Run `newcontainer` for `id` with `token` through the runtime while
    /// the agent answers it; returns the ioBase the proxy chose.
    ///
    /// # Panics
    ///
    /// If the Hyper call fails or the relocation is wrong.
    pub async fn newcontainer(&mut self, id: &str, token: &str) -> u64 {
        let data = newcontainer_data(id);
        let tokens = [token];
        let (res, io_base) = tokio::join!(
            self.runtime.hyper("newcontainer", &tokens, Some(&data)),
            async {
                let v = self.agent.expect_ctl_json(Code::NewContainer).await;
                let p = &v["process"];
                let io_base = p["stdio"].as_u64().unwrap_or(0);
                assert!(io_base >= 3 && io_base % 2 == 1, "process.stdio in {v}");
                assert_eq!(
                    p["stderr"].as_u64(),
                    Some(io_base + 1),
                    "process.stderr in {v}"
                );
                assert_eq!(v["id"], id, "container id in {v}");
                assert_eq!(p["args"][2], "cat", "other fields pass through: {v}");
                self.agent.reply_ack(b"").await;
                io_base
            }
        );
        res.unwrap_or_else(|e| panic!("Hyper newcontainer {id}: {e}"));
        io_base
    }
}

/// The daemon still serves a fresh VM end to end: RegisterVM with a new
/// agent, a shim, `newcontainer` with its token, stdin to the agent, stdout
/// and stderr to the shim, the exit code, UnregisterVM.
///
/// # Panics
///
/// If any step fails (the daemon's log is printed when `proxy` drops).
pub async fn assert_serves_fresh_vm(proxy: &ProxyProcess) {
    let mut vm = Vm::register(proxy, 1).await;
    let token = vm.tokens[0].clone();
    let mut c = vm.start_container(proxy, &token).await;
    c.shim.stdin(&b"ping"[..]).await;
    assert_eq!(&vm.agent.expect_io(c.io_base).await[..], b"ping");
    vm.agent.send_io(c.io_base, b"pong").await;
    assert_eq!(&c.shim.expect_stdout(4).await[..], b"pong");
    vm.agent.send_io(c.io_base + 1, b"oops").await;
    assert_eq!(&c.shim.expect_stderr(4).await[..], b"oops");
    vm.agent.send_exit(c.io_base, 42).await;
    assert_eq!(c.shim.expect_exit().await, 42);
    vm.runtime
        .unregister_vm(&vm.id)
        .await
        .unwrap_or_else(|e| panic!("UnregisterVM {}: {e}", vm.id));
}
