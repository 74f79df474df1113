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
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let r = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    r.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reference_levels_map() {
        assert_eq!(super::level("fatal").unwrap(), "error");
        assert_eq!(super::level("DEBUG").unwrap(), "debug");
        assert!(super::level("loud").is_err());
    }
}
