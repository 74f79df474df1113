//! A blocking client of the daemon: the runtime's commands and the shim's
//! claim, over the same [`RecvBuf`] the hot readers use (so no byte read
//! while waiting for a response is lost when a reader takes over).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use proxy_proto::payload::{ConnectShim, ErrorResponse, Hyper, RegisterVm, RegisterVmResponse};
use proxy_proto::{Command, Frame, FrameKind};

use crate::wire::{next_frame, write_all, RecvBuf};

/// How long any single response or read may take before the bench fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection to the daemon.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub s: UnixStream,
    /// Bytes read and not yet parsed.
    pub rb: RecvBuf,
}

impl Conn {
    /// Connect to the daemon's socket; `buf` is the receive buffer size.
    pub fn connect(socket: &Path, buf: usize) -> Result<Self, String> {
        let s = UnixStream::connect(socket)
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        Ok(Self {
            s,
            rb: RecvBuf::new(buf),
        })
    }

    /// Read one whole frame: its kind and payload (copied; not a hot path).
    pub fn read_frame(&mut self) -> Result<(FrameKind, Vec<u8>), String> {
        let (kind, at, total) =
            next_frame(&mut self.rb, &mut &self.s)?.ok_or("the daemon closed the connection")?;
        let payload = self.rb.data()[at..total].to_vec();
        self.rb.consume(total);
        Ok((kind, payload))
    }

    /// Wait for the response to `cmd`: `Ok(payload)` or `Err(msg)`.
    pub fn response(&mut self, cmd: Command) -> Result<Vec<u8>, String> {
        let (kind, payload) = self.read_frame()?;
        match kind {
            FrameKind::Response { command, error } if command == cmd => {
                if error {
                    let e: ErrorResponse = serde_json::from_slice(&payload).unwrap_or_default();
                    Err(format!("{} failed: {}", cmd.name(), e.msg))
                } else {
                    Ok(payload)
                }
            }
            other => Err(format!(
                "expected the response to {}, got {other:?} ({} bytes)",
                cmd.name(),
                payload.len()
            )),
        }
    }

    /// A command and its response.
    pub fn call(&mut self, cmd: Command, payload: Vec<u8>) -> Result<Vec<u8>, String> {
        write_all(&mut &self.s, &Frame::command(cmd, payload).to_bytes())?;
        self.response(cmd)
    }

    /// RegisterVM with `n` tokens; returns them.
    pub fn register_vm(
        &mut self,
        id: &str,
        ctl: &Path,
        io: &Path,
        n: u32,
    ) -> Result<Vec<String>, String> {
        let p = RegisterVm {
            container_id: id.into(),
            ctl_serial: path_str(ctl)?.into(),
            io_serial: path_str(io)?.into(),
            num_io_streams: n,
            ..Default::default()
        };
        let r = self.call(Command::RegisterVm, json(&p)?)?;
        let r: RegisterVmResponse =
            serde_json::from_slice(&r).map_err(|e| format!("RegisterVM response: {e}"))?;
        if r.io.tokens.len() != n as usize {
            return Err(format!(
                "RegisterVM asked for {n} tokens and got {}",
                r.io.tokens.len()
            ));
        }
        Ok(r.io.tokens)
    }

    /// AttachVM: this connection's commands go to the VM `id` too.
    pub fn attach_vm(&mut self, id: &str) -> Result<(), String> {
        let p = serde_json::json!({ "containerId": id });
        self.call(Command::AttachVm, json(&p)?).map(drop)
    }

    /// UnregisterVM.
    pub fn unregister_vm(&mut self, id: &str) -> Result<(), String> {
        let p = serde_json::json!({ "containerId": id });
        self.call(Command::UnregisterVm, json(&p)?).map(drop)
    }

    /// Hyper; returns the agent's ACK payload.
    pub fn hyper(
        &mut self,
        name: &str,
        token: Option<&str>,
        data: &str,
    ) -> Result<Vec<u8>, String> {
        let tokens = token.map(|t| vec![t.to_string()]).unwrap_or_default();
        let p = Hyper::new(name, tokens, Some(data)).map_err(|e| format!("Hyper data: {e}"))?;
        self.call(Command::Hyper, json(&p)?)
    }

    /// ConnectShim: this connection becomes the token's shim.
    pub fn connect_shim(&mut self, token: &str) -> Result<(), String> {
        self.call(Command::ConnectShim, connect_shim_payload(token)?)
            .map(drop)
    }

    /// DisconnectShim (no response; the daemon closes the connection).
    pub fn disconnect_shim(self) -> Result<(), String> {
        write_all(
            &mut &self.s,
            &Frame::command(Command::DisconnectShim, &b"{}"[..]).to_bytes(),
        )
    }
}

/// ConnectShim's payload.
pub fn connect_shim_payload(token: &str) -> Result<Vec<u8>, String> {
    json(&ConnectShim {
        token: token.into(),
        resume: None,
    })
}

/// A value as JSON bytes.
pub fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| format!("JSON: {e}"))
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", p.display()))
}
