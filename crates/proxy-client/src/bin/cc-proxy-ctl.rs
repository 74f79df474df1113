//! `cc-proxy-ctl`: talk to a running `cc-proxy` by hand.
//!
//! ```text
//! cc-proxy-ctl register pod-1 --ctl /run/vm/ctl.sock --io /run/vm/io.sock --tokens 2
//! cc-proxy-ctl hyper --vm pod-1 ping
//! cc-proxy-ctl hyper --vm pod-1 startpod '{"hostname":"pod-1"}'
//! cc-proxy-ctl --json attach pod-1 --tokens 1
//! cc-proxy-ctl unregister pod-1
//! cc-proxy-ctl stats --metrics-socket /run/cc-proxy/metrics.sock
//! ```

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proxy_client::blocking::Client;
use proxy_client::{Error, Token, VmIo, VmSpec};

#[path = "cc-proxy-ctl/stats.rs"]
mod stats;

/// The daemon's default socket.
const DEFAULT_SOCKET: &str = "/run/cc-proxy/proxy.sock";

#[derive(Debug, Parser)]
#[command(
    name = "cc-proxy-ctl",
    version,
    about = "Register, attach and unregister VMs and send agent commands through a running cc-proxy"
)]
pub(crate) struct Args {
    /// The proxy's socket: a path or unix:///path.
    #[arg(
        short,
        long,
        global = true,
        env = "CC_PROXY_SOCKET",
        default_value = DEFAULT_SOCKET,
        value_name = "ADDR"
    )]
    socket: String,
    /// Print the proxy's answers as JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Register a VM: the proxy connects to its agent and waits for READY.
    Register {
        /// The VM's (pod's) container id.
        container_id: String,
        /// The agent's control channel: a path, unix://path, vsock://cid:port or hvsock://path:port.
        #[arg(long, value_name = "ADDR")]
        ctl: String,
        /// The agent's I/O channel, in the same forms.
        #[arg(long, value_name = "ADDR")]
        io: String,
        /// The VM console to read and log (optional).
        #[arg(long, value_name = "ADDR")]
        console: Option<String>,
        /// How many I/O tokens to allocate.
        #[arg(long, default_value_t = 0, value_name = "N")]
        tokens: u32,
    },
    /// Allocate more I/O tokens for a registered VM.
    Attach {
        /// The VM's container id.
        container_id: String,
        /// How many I/O tokens to allocate.
        #[arg(long, default_value_t = 0, value_name = "N")]
        tokens: u32,
    },
    /// Unregister a VM.
    Unregister {
        /// The VM's container id.
        container_id: String,
    },
    /// Send a hyperstart command (ping, startpod, newcontainer, …) to a VM's agent.
    Hyper {
        /// The VM to send it to.
        #[arg(long, value_name = "ID")]
        vm: String,
        /// An I/O token for newcontainer or execcmd: the process's stdio goes to its shim.
        /// (Tokens may start with '-'.)
        #[arg(long, value_name = "TOKEN", allow_hyphen_values = true)]
        token: Option<String>,
        /// The command's name.
        name: String,
        /// The command's data, as JSON.
        data: Option<String>,
    },
    /// Show the daemon's figures (VMs, sessions, bytes, queues, errors, ctl
    /// round trips) from its metrics endpoint: give the address the daemon
    /// was started with (`cc-proxy --metrics-addr` or `--metrics-socket`);
    /// the proxy socket is not used. See docs/METRICS.md.
    Stats(stats::StatsArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.cmd {
        // From the metrics endpoint, not the proxy socket.
        Cmd::Stats(s) => stats::run(s, args.json),
        // The proxy's own words; the wire command behind them (the
        // AttachVM of `hyper --vm`) is no concern of the user's.
        _ => run(&args).map_err(|e| e.proxy_msg().map_or_else(|| e.to_string(), str::to_owned)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let what = args.cmd.describe();
            if args.json {
                // Where the answers go, so a script reads one JSON object
                // whatever happened.
                let v = serde_json::json!({
                    "error": { "command": what, "message": e.to_string() }
                });
                println!("{v}");
            } else {
                eprintln!("cc-proxy-ctl: {what} failed: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

impl Cmd {
    /// What the user asked for, in their words: `hyper ping on VM pod-1`.
    fn describe(&self) -> String {
        match self {
            Cmd::Register { container_id, .. } => format!("register {container_id}"),
            Cmd::Attach { container_id, .. } => format!("attach {container_id}"),
            Cmd::Unregister { container_id } => format!("unregister {container_id}"),
            Cmd::Hyper { vm, name, .. } => format!("hyper {name} on VM {vm}"),
            Cmd::Stats(_) => "stats".into(),
        }
    }
}

fn run(args: &Args) -> Result<(), Error> {
    let client = Client::connect(args.socket.as_str())?;
    match &args.cmd {
        Cmd::Register {
            container_id,
            ctl,
            io,
            console,
            tokens,
        } => {
            let mut vm = VmSpec::new(container_id, ctl, io).tokens(*tokens);
            vm.console = console.clone();
            let r = client.register_vm(vm)?;
            print_io(args.json, &format!("registered {container_id}"), &r);
        }
        Cmd::Attach {
            container_id,
            tokens,
        } => {
            let r = client.attach_vm(container_id, *tokens)?;
            print_io(args.json, &format!("attached to {container_id}"), &r);
        }
        Cmd::Unregister { container_id } => {
            client.unregister_vm(container_id)?;
            if args.json {
                println!("{{}}");
            } else {
                println!("unregistered {container_id}");
            }
        }
        Cmd::Hyper {
            vm,
            token,
            name,
            data,
        } => {
            // Reaching the VM is a step of this command, not one the user
            // asked for: its error is the command's.
            client.attach_vm(vm, 0)?;
            let tokens: Vec<Token> = token.iter().map(|t| Token::from(t.as_str())).collect();
            let reply = client.hyper(name, &tokens, data.as_deref())?;
            print_reply(args.json, name, &reply);
        }
        // Served by `main` without the proxy socket.
        Cmd::Stats(_) => {}
    }
    Ok(())
}

fn print_io(json: bool, what: &str, io: &VmIo) {
    if json {
        let tokens: Vec<&str> = io.tokens.iter().map(Token::as_str).collect();
        let v = serde_json::json!({ "io": { "URL": io.url, "tokens": tokens } });
        println!("{v}");
        return;
    }
    println!("{what}");
    println!("shims connect to: {}", io.url);
    if io.tokens.is_empty() {
        println!("no tokens");
    } else {
        println!("tokens:");
        for t in &io.tokens {
            println!("  {t}");
        }
    }
}

fn print_reply(json: bool, name: &str, reply: &[u8]) {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(reply).ok();
    match (json, parsed) {
        (true, Some(v)) => println!("{v}"),
        (true, None) if reply.is_empty() => println!("null"),
        (true, None) => println!("{}", serde_json::Value::String(lossy(reply))),
        (false, _) if reply.is_empty() => println!("{name}: ok"),
        (false, Some(v)) => println!(
            "{name}: ok\n{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        ),
        (false, None) => println!("{name}: ok\n{}", describe_raw(reply)),
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A reply that is not JSON: as text when it is text, else in hex (the
/// agent's version reply is a 4-byte integer).
fn describe_raw(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n') => s.to_owned(),
        _ => {
            let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
            let mut s = format!("{} bytes: {}", b.len(), hex.join(" "));
            if let Ok(arr) = <[u8; 4]>::try_from(b) {
                s.push_str(&format!(" (u32 {})", u32::from_be_bytes(arr)));
            }
            s
        }
    }
}
