//! A runtime's part, as a program: register a VM, start a pod, and run one
//! process with an I/O token, printing the token for its shim.
//!
//! ```text
//! cargo run -p proxy-client --example runtime -- \
//!     /run/cc-proxy/proxy.sock pod-1 /run/vm/ctl.sock /run/vm/io.sock sh -c 'echo hi'
//! # then, in another terminal, the shim:
//! cargo run -p proxy-client --bin cc-proxy-shim -- -c c1 -t <token> -u unix:///run/cc-proxy/proxy.sock
//! ```

use proxy_client::{Client, VmSpec};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, id, ctl, io, cmd @ ..] = &args[..] else {
        eprintln!("usage: runtime <proxy socket> <vm id> <ctl addr> <io addr> <command…>");
        std::process::exit(2);
    };
    let client = Client::connect(socket.as_str()).await?;
    let io = client
        .register_vm(VmSpec::new(id, ctl, io).tokens(1))
        .await?;
    let token = &io.tokens[0];
    println!("shim: cc-proxy-shim -c c1 -t {token} -u {}", io.url);
    client
        .hyper_json("startpod", &[], &serde_json::json!({ "hostname": id }))
        .await?;
    // The proxy waits (30 s by default) for the token's shim to connect,
    // then starts the process with its stdio going to that shim.
    let data = serde_json::json!({
        "id": "c1",
        "process": { "args": cmd, "terminal": false, "envs": [], "workdir": "/" },
    });
    client
        .hyper_json("newcontainer", std::slice::from_ref(token), &data)
        .await?;
    println!("started");
    Ok(())
}
