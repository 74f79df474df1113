//! hyperstart control channel: `u32 code | u32 length (header included) | payload`.

#[cfg(feature = "alloc")]
use bytes::{Buf, BufMut, Bytes, BytesMut};

#[cfg(feature = "alloc")]
use crate::error::HyperError;

/// Size of a ctl message header.
pub const CTL_HEADER_LEN: usize = 8;

/// hyperstart ctl message codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    /// Agent version.
    Version = 0,
    /// Start the pod (sandbox).
    StartPod = 1,
    /// Deprecated.
    GetPod = 2,
    /// Deprecated.
    StopPod = 3,
    /// Destroy the pod; the agent powers off.
    DestroyPod = 4,
    /// Deprecated.
    RestartContainer = 5,
    /// Run an extra process in a container.
    ExecCmd = 6,
    /// Deprecated.
    FinishCmd = 7,
    /// Agent → proxy: the agent is up.
    Ready = 8,
    /// Success reply, payload = result.
    Ack = 9,
    /// Failure reply, payload = message.
    Error = 10,
    /// Resize a process's terminal.
    WinSize = 11,
    /// Liveness check.
    Ping = 12,
    /// Deprecated.
    FinishPod = 13,
    /// Flow-control hint; ignored by the proxy.
    Next = 14,
    /// Write a file in the guest.
    WriteFile = 15,
    /// Read a file in the guest.
    ReadFile = 16,
    /// Create and start a container (its init process).
    NewContainer = 17,
    /// Signal a container's process.
    KillContainer = 18,
    /// Hot-plugged CPU/memory online.
    OnlineCpuMem = 19,
    /// Configure a network interface.
    SetupInterface = 20,
    /// Configure routes.
    SetupRoute = 21,
    /// Remove a container.
    RemoveContainer = 22,
    /// List a container's processes.
    PsContainer = 23,
    /// Agent → proxy event, not a reply.
    ProcessAsyncEvent = 24,
}

impl Code {
    /// Every code, in numeric order.
    pub const ALL: [Code; 25] = [
        Self::Version,
        Self::StartPod,
        Self::GetPod,
        Self::StopPod,
        Self::DestroyPod,
        Self::RestartContainer,
        Self::ExecCmd,
        Self::FinishCmd,
        Self::Ready,
        Self::Ack,
        Self::Error,
        Self::WinSize,
        Self::Ping,
        Self::FinishPod,
        Self::Next,
        Self::WriteFile,
        Self::ReadFile,
        Self::NewContainer,
        Self::KillContainer,
        Self::OnlineCpuMem,
        Self::SetupInterface,
        Self::SetupRoute,
        Self::RemoveContainer,
        Self::PsContainer,
        Self::ProcessAsyncEvent,
    ];

    /// The code for a raw value, if known.
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(v).ok()?).copied()
    }

    /// hyperstart's lower-case name for the code.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Version => "version",
            Self::StartPod => "startpod",
            Self::GetPod => "getpod",
            Self::StopPod => "stoppod",
            Self::DestroyPod => "destroypod",
            Self::RestartContainer => "restartcontainer",
            Self::ExecCmd => "execcmd",
            Self::FinishCmd => "finishcmd",
            Self::Ready => "ready",
            Self::Ack => "ack",
            Self::Error => "error",
            Self::WinSize => "winsize",
            Self::Ping => "ping",
            Self::FinishPod => "finishpod",
            Self::Next => "next",
            Self::WriteFile => "writefile",
            Self::ReadFile => "readfile",
            Self::NewContainer => "newcontainer",
            Self::KillContainer => "killcontainer",
            Self::OnlineCpuMem => "onlinecpumem",
            Self::SetupInterface => "setupinterface",
            Self::SetupRoute => "setuproute",
            Self::RemoveContainer => "removecontainer",
            Self::PsContainer => "pscontainer",
            Self::ProcessAsyncEvent => "processasyncevent",
        }
    }

    /// The code for a `hyperName` a client may send in a Hyper command.
    /// Deprecated commands and `processasyncevent` are not accepted.
    pub fn from_hyper_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.accepted_in_hyper() && c.name() == name)
    }

    /// Whether clients may name this code in a Hyper command (§6).
    pub const fn accepted_in_hyper(self) -> bool {
        !matches!(
            self,
            Self::GetPod
                | Self::StopPod
                | Self::RestartContainer
                | Self::FinishCmd
                | Self::FinishPod
                | Self::ProcessAsyncEvent
        )
    }

    /// Whether this command starts a process (and so may take a token).
    pub const fn starts_process(self) -> bool {
        matches!(self, Self::NewContainer | Self::ExecCmd)
    }
}

impl core::fmt::Display for Code {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// The 8 header bytes of a ctl message, unjudged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtlHeader {
    /// Raw code.
    pub code: u32,
    /// Length including the 8-byte header.
    pub len: u32,
}

impl CtlHeader {
    /// Read the fields.
    pub const fn parse(b: &[u8; CTL_HEADER_LEN]) -> Self {
        Self {
            code: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            len: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// The header bytes.
    pub const fn to_bytes(&self) -> [u8; CTL_HEADER_LEN] {
        let c = self.code.to_be_bytes();
        let l = self.len.to_be_bytes();
        [c[0], c[1], c[2], c[3], l[0], l[1], l[2], l[3]]
    }
}

/// One ctl message. The code is kept raw so that a newer agent's codes are
/// not a framing error; [`CtlMessage::code`] types it.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlMessage {
    /// Raw code.
    pub code: u32,
    /// Payload (JSON or empty), zero-copy.
    pub payload: Bytes,
}

#[cfg(feature = "alloc")]
impl CtlMessage {
    /// A message with a known code.
    pub fn new(code: Code, payload: impl Into<Bytes>) -> Self {
        Self {
            code: code as u32,
            payload: payload.into(),
        }
    }

    /// The typed code, if known.
    pub fn code(&self) -> Option<Code> {
        Code::from_u32(self.code)
    }

    /// Bytes on the wire.
    pub fn encoded_len(&self) -> usize {
        CTL_HEADER_LEN + self.payload.len()
    }

    /// Append the message to `dst`, refusing one over `max_len` bytes.
    pub fn encode<B: BufMut + ?Sized>(
        &self,
        dst: &mut B,
        max_len: usize,
    ) -> Result<(), HyperError> {
        let len = self.encoded_len();
        if len > max_len {
            return Err(HyperError::MessageTooLarge {
                channel: "ctl",
                len: len as u64,
                max: max_len as u64,
            });
        }
        let len = u32::try_from(len).map_err(|_| HyperError::MessageTooLarge {
            channel: "ctl",
            len: len as u64,
            max: u64::from(u32::MAX),
        })?;
        dst.put_slice(
            &CtlHeader {
                code: self.code,
                len,
            }
            .to_bytes(),
        );
        dst.put_slice(&self.payload);
        Ok(())
    }
}

/// Incremental ctl decoder (same answers as [`crate::FrameDecoder`]).
#[cfg(feature = "alloc")]
#[derive(Debug, Clone)]
pub struct CtlDecoder {
    max_len: usize,
}

#[cfg(feature = "alloc")]
impl Default for CtlDecoder {
    fn default() -> Self {
        Self::new(super::MAX_MESSAGE_LEN)
    }
}

#[cfg(feature = "alloc")]
impl CtlDecoder {
    /// A decoder refusing messages over `max_len` bytes (header included).
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }

    /// Take one message off the front of `src`; on error `src` is untouched.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<CtlMessage>, HyperError> {
        let Some(b) = src.get(..CTL_HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; CTL_HEADER_LEN];
        h.copy_from_slice(b);
        let h = CtlHeader::parse(&h);
        let total = check_len("ctl", h.len, CTL_HEADER_LEN, self.max_len)?;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut msg = src.split_to(total);
        msg.advance(CTL_HEADER_LEN);
        Ok(Some(CtlMessage {
            code: h.code,
            payload: msg.freeze(),
        }))
    }
}

#[cfg(feature = "alloc")]
pub(crate) fn check_len(
    channel: &'static str,
    len: u32,
    header: usize,
    max: usize,
) -> Result<usize, HyperError> {
    let total = len as usize;
    if total < header {
        return Err(HyperError::LengthTooShort {
            channel,
            len,
            min: header as u32,
        });
    }
    if total > max {
        return Err(HyperError::MessageTooLarge {
            channel,
            len: u64::from(len),
            max: max as u64,
        });
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_table_matches_spec() {
        for (i, c) in Code::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
            assert_eq!(Code::from_u32(i as u32), Some(*c));
        }
        assert_eq!(Code::from_u32(25), None);
        assert_eq!(Code::from_u32(u32::MAX), None);
        let accepted = [
            "version",
            "startpod",
            "destroypod",
            "execcmd",
            "ready",
            "ack",
            "error",
            "winsize",
            "ping",
            "next",
            "writefile",
            "readfile",
            "newcontainer",
            "killcontainer",
            "onlinecpumem",
            "setupinterface",
            "setuproute",
            "removecontainer",
            "pscontainer",
        ];
        for n in accepted {
            let c = Code::from_hyper_name(n).unwrap();
            assert_eq!(c.name(), n);
        }
        let n_accepted = Code::ALL.iter().filter(|c| c.accepted_in_hyper()).count();
        assert_eq!(n_accepted, accepted.len());
        for n in [
            "getpod",
            "stoppod",
            "finishcmd",
            "processasyncevent",
            "NEWCONTAINER",
            "",
        ] {
            assert_eq!(Code::from_hyper_name(n), None, "{n}");
        }
    }

    #[cfg(feature = "alloc")]
    #[test]
    fn ctl_round_trip_and_limits() {
        let m = CtlMessage::new(Code::Ack, &b"{}"[..]);
        let mut buf = BytesMut::new();
        m.encode(&mut buf, 10240).unwrap();
        assert_eq!(&buf[..], &[0, 0, 0, 9, 0, 0, 0, 10, b'{', b'}']);
        let mut dec = CtlDecoder::default();
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(m));

        let big = CtlMessage::new(Code::NewContainer, alloc::vec![b' '; 10233]);
        assert_eq!(
            big.encode(&mut BytesMut::new(), 10240).unwrap_err(),
            HyperError::MessageTooLarge {
                channel: "ctl",
                len: 10241,
                max: 10240
            }
        );
        let mut short = BytesMut::from(&[0u8, 0, 0, 9, 0, 0, 0, 7][..]);
        assert_eq!(
            dec.decode(&mut short).unwrap_err(),
            HyperError::LengthTooShort {
                channel: "ctl",
                len: 7,
                min: 8
            }
        );
        let mut huge = BytesMut::from(&[0u8, 0, 0, 9, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            dec.decode(&mut huge).unwrap_err(),
            HyperError::MessageTooLarge { .. }
        ));
        assert_eq!(huge.capacity(), 8);
    }
}
