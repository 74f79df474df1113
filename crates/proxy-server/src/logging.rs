//! tracing setup: plain lines (journald-friendly) or JSON, to stderr.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The tracing level for one of the reference's `-log` levels.
pub fn level(name: &str) -> Result<&'static str, String> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" | "fatal" | "panic" => "error",
        other => {
            return Err(format!(
                "invalid log level {other:?} (debug, info, warn, error, fatal, panic)"
            ))
        }
    })
}

/// Install the global subscriber. `RUST_LOG` refines the level if set.
pub fn init(level_name: &str, format: LogFormat) -> Result<(), String> {
    let lvl = level(level_name)?;
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(lvl));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(EscapingStderr { ansi })
        .with_ansi(ansi);
    let r = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    r.map_err(|e| e.to_string())
}

/// Standard error, with every control character inside a log line
/// escaped: strings from clients and agents (container ids, log stream
/// messages, agent errors, console lines) reach the log through many
/// fields, and a newline in any of them would otherwise forge a line of
/// its own. One event is one `write` of a whole formatted line, so only
/// the line's final newline is kept. JSON output is escaped by its
/// encoder already; nothing changes there. With colours on (a terminal),
/// the escape character of the formatter's own colour codes is kept.
#[derive(Debug, Clone, Copy)]
struct EscapingStderr {
    ansi: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for EscapingStderr {
    type Writer = EscapingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter { ansi: self.ansi }
    }
}

#[derive(Debug)]
struct EscapingWriter {
    ansi: bool,
}

impl std::io::Write for EscapingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = escape_line(buf, self.ansi);
        std::io::stderr().lock().write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `buf` with its control characters (but a tab, the final newline and,
/// if `keep_esc`, ESC) written as `\n`, `\r` or `\xNN`.
pub fn escape_line(buf: &[u8], keep_esc: bool) -> std::borrow::Cow<'_, [u8]> {
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    let bad = |b: u8| (b < 0x20 && b != b'\t' && !(keep_esc && b == 0x1b)) || b == 0x7f;
    if !body.iter().copied().any(bad) {
        return std::borrow::Cow::Borrowed(buf);
    }
    let mut out = Vec::with_capacity(buf.len() + 16);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b if bad(b) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'x',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 15)],
                ]);
            }
            b => out.push(b),
        }
    }
    if body.len() < buf.len() {
        out.push(b'\n');
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape_line;

    #[test]
    fn control_characters_inside_a_line_are_escaped() {
        assert_eq!(&escape_line(b"plain\tline\n", false)[..], b"plain\tline\n");
        assert_eq!(
            &escape_line(b"id=pod\nFORGED INFO x\r\x1b[2J\x7f\n", false)[..],
            &b"id=pod\\nFORGED INFO x\\r\\x1b[2J\\x7f\n"[..]
        );
        assert_eq!(&escape_line(b"a\x1b[1mb\n", true)[..], b"a\x1b[1mb\n");
        assert_eq!(&escape_line(b"a\x00", true)[..], b"a\\x00");
    }

    #[test]
    fn reference_levels_map() {
        assert_eq!(super::level("fatal").unwrap(), "error");
        assert_eq!(super::level("DEBUG").unwrap(), "debug");
        assert!(super::level("loud").is_err());
    }
}
