//! A minimal shim: claim a token, copy the process's output to ours, exit
//! with its code. (`cc-proxy-shim` is the complete one.)
//!
//! ```text
//! cargo run -p proxy-client --example shim -- unix:///run/cc-proxy/proxy.sock <token>
//! ```

use proxy_client::{Shim, ShimEvent};
use tokio::io::AsyncWriteExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token] = &args[..] else {
        eprintln!("usage: shim <proxy url> <token>");
        std::process::exit(2);
    };
    let (shim, mut events) = Shim::connect(url.as_str(), token.as_str()).await?;
    shim.close_stdin().await?;
    let code = loop {
        match events.recv().await? {
            ShimEvent::Stdout(b) => tokio::io::stdout().write_all(&b).await?,
            ShimEvent::Stderr(b) => tokio::io::stderr().write_all(&b).await?,
            ShimEvent::Exited(code) => break code,
        }
    };
    std::process::exit(code.into())
}
