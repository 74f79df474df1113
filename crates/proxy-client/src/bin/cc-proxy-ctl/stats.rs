//! `cc-proxy-ctl stats`: the daemon's metrics endpoint (docs/METRICS.md),
//! fetched over HTTP and shown as a table (or JSON).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

/// How long fetching the metrics may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response read.
const MAX_RESPONSE: u64 = 64 << 20;

/// Where the daemon serves its metrics: the address given to its own
/// `--metrics-addr` or `--metrics-socket`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The daemon's --metrics-addr (host:port).
    #[arg(long, value_name = "ADDR", env = "CC_PROXY_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// The daemon's --metrics-socket (a unix socket path).
    #[arg(
        long,
        value_name = "PATH",
        env = "CC_PROXY_METRICS_SOCKET",
        conflicts_with = "metrics_addr"
    )]
    metrics_socket: Option<String>,
}

/// Fetch and print.
pub fn run(args: &StatsArgs, as_json: bool) -> Result<(), String> {
    let text = fetch(args)?;
    let m = Exposition::parse(&text)?;
    if as_json {
        println!("{}", to_json(&m));
    } else {
        print!("{}", to_table(&m));
    }
    Ok(())
}

fn fetch(args: &StatsArgs) -> Result<String, String> {
    let request = b"GET /metrics HTTP/1.0\r\nHost: cc-proxy\r\nAccept: text/plain\r\n\r\n";
    let (raw, from) = match (&args.metrics_addr, &args.metrics_socket) {
        (Some(addr), _) => {
            let s = std::net::TcpStream::connect(addr.as_str())
                .map_err(|e| format!("cannot connect to the metrics endpoint at {addr}: {e}"))?;
            (exchange(s, request), addr.clone())
        }
        (None, Some(path)) => {
            let s = std::os::unix::net::UnixStream::connect(path)
                .map_err(|e| format!("cannot connect to the metrics endpoint at {path}: {e}"))?;
            (exchange(s, request), path.clone())
        }
        (None, None) => {
            return Err(
                "stats needs the daemon's metrics endpoint: --metrics-addr HOST:PORT or \
                 --metrics-socket PATH (as given to cc-proxy)"
                    .into(),
            )
        }
    };
    let raw = raw.map_err(|e| format!("reading metrics from {from}: {e}"))?;
    let text = String::from_utf8(raw).map_err(|_| format!("{from}: the answer is not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{from}: not an HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        return Err(format!("{from}: {status}"));
    }
    Ok(body.to_owned())
}

trait Timeouts {
    fn timeouts(&self);
}

impl Timeouts for std::net::TcpStream {
    fn timeouts(&self) {
        self.set_read_timeout(Some(TIMEOUT)).ok();
        self.set_write_timeout(Some(TIMEOUT)).ok();
    }
}

impl Timeouts for std::os::unix::net::UnixStream {
    fn timeouts(&self) {
        self.set_read_timeout(Some(TIMEOUT)).ok();
        self.set_write_timeout(Some(TIMEOUT)).ok();
    }
}

fn exchange<S: Read + Write + Timeouts>(mut s: S, request: &[u8]) -> std::io::Result<Vec<u8>> {
    s.timeouts();
    s.write_all(request)?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE).read_to_end(&mut raw)?;
    Ok(raw)
}

/// One sample: its labels and value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    labels: Vec<(String, String)>,
    value: f64,
}

/// The samples of an exposition, by series name.
#[derive(Debug, Default)]
struct Exposition(BTreeMap<String, Vec<Sample>>);

impl Exposition {
    /// Parse the Prometheus text format (what cc-proxy writes).
    fn parse(text: &str) -> Result<Self, String> {
        let mut m = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || format!("metrics line {}: cannot read {line:?}", n + 1);
            let (name, labels, rest) = match line.find(['{', ' ']) {
                Some(i) if line.as_bytes()[i] == b'{' => {
                    let (labels, used) = parse_labels(&line[i + 1..]).ok_or_else(bad)?;
                    (&line[..i], labels, &line[i + 1 + used..])
                }
                Some(i) => (&line[..i], Vec::new(), &line[i..]),
                None => return Err(bad()),
            };
            let value = rest.split_whitespace().next().ok_or_else(bad)?;
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().map_err(|_| bad())?,
            };
            m.0.entry(name.to_owned())
                .or_default()
                .push(Sample { labels, value });
        }
        Ok(m)
    }

    /// The value of an unlabelled series.
    fn one(&self, name: &str) -> Option<f64> {
        self.0.get(name)?.first().map(|s| s.value)
    }

    /// A labelled series: label value → value, in order of appearance.
    fn by(&self, name: &str, label: &str) -> Vec<(String, f64)> {
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let v = s.labels.iter().find(|(k, _)| k == label)?;
                Some((v.1.clone(), s.value))
            })
            .collect()
    }
}

/// `k="v",…}` → the labels and the bytes used (through the `}`).
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, usize)> {
    let mut labels = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        match chars.peek() {
            Some((i, '}')) => return Some((labels, i + 1)),
            Some((_, ',' | ' ')) => {
                chars.next();
                continue;
            }
            Some(_) => {}
            None => return None,
        }
        let mut key = String::new();
        for (_, c) in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                c => value.push(c),
            }
        }
        labels.push((key, value));
    }
}

/// The per-VM figures, by container id.
const VM_COLUMNS: [(&str, &str, &str); 8] = [
    ("cc_proxy_vm_sessions", "SESSIONS", "sessions"),
    ("cc_proxy_vm_shims_connected", "SHIMS", "shims_connected"),
    (
        "cc_proxy_vm_io_from_agent_bytes_total",
        "BYTES FROM AGENT",
        "io_from_agent_bytes",
    ),
    (
        "cc_proxy_vm_io_from_agent_messages_total",
        "MSGS FROM AGENT",
        "io_from_agent_messages",
    ),
    (
        "cc_proxy_vm_io_to_agent_bytes_total",
        "BYTES TO AGENT",
        "io_to_agent_bytes",
    ),
    (
        "cc_proxy_vm_io_to_agent_messages_total",
        "MSGS TO AGENT",
        "io_to_agent_messages",
    ),
    (
        "cc_proxy_vm_output_queued_bytes",
        "QUEUED",
        "output_queued_bytes",
    ),
    (
        "cc_proxy_vm_output_queued_max_session_bytes",
        "FULLEST SESSION",
        "output_queued_max_session_bytes",
    ),
];

/// The daemon-wide figures: series, text label, JSON key.
const DAEMON: [(&str, &str, &str); 9] = [
    ("cc_proxy_vms", "VMs", "vms"),
    ("cc_proxy_tokens", "tokens", "tokens"),
    ("cc_proxy_sessions", "sessions", "sessions"),
    (
        "cc_proxy_shims_connected",
        "shims connected",
        "shims_connected",
    ),
    (
        "cc_proxy_connections_open",
        "connections open",
        "connections_open",
    ),
    (
        "cc_proxy_connections_accepted_total",
        "connections accepted",
        "connections_accepted",
    ),
    (
        "cc_proxy_session_buffer_bytes",
        "session buffer (bytes)",
        "session_buffer_bytes",
    ),
    (
        "cc_proxy_memory_budget_bytes",
        "memory budget (bytes)",
        "memory_budget_bytes",
    ),
    (
        "cc_proxy_memory_budget_used_bytes",
        "memory budget used",
        "memory_budget_used_bytes",
    ),
];

fn num(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => format!("{}", v as i64),
        Some(v) => format!("{v}"),
    }
}

/// Container id → column values, in VM_COLUMNS order.
fn vm_rows(m: &Exposition) -> BTreeMap<String, Vec<Option<f64>>> {
    let mut rows: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    for (i, (series, _, _)) in VM_COLUMNS.iter().enumerate() {
        for (id, v) in m.by(series, "container_id") {
            rows.entry(id)
                .or_insert_with(|| vec![None; VM_COLUMNS.len()])[i] = Some(v);
        }
    }
    rows
}

/// The ctl round trips: count, mean seconds, and the bucket bound under
/// which half and 99 % of them fall.
fn ctl_summary(m: &Exposition) -> (f64, Option<f64>, Option<f64>, Option<f64>) {
    let count = m
        .one("cc_proxy_ctl_round_trip_seconds_count")
        .unwrap_or(0.0);
    let sum = m.one("cc_proxy_ctl_round_trip_seconds_sum").unwrap_or(0.0);
    let buckets: Vec<(f64, f64)> = m
        .by("cc_proxy_ctl_round_trip_seconds_bucket", "le")
        .into_iter()
        .filter_map(|(le, n)| {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n))
        })
        .collect();
    let quantile = |q: f64| {
        buckets
            .iter()
            .find(|(_, n)| count > 0.0 && *n >= q * count)
            .map(|(le, _)| *le)
    };
    let mean = (count > 0.0).then(|| sum / count);
    (count, mean, quantile(0.5), quantile(0.99))
}

fn fmt_secs(s: f64) -> String {
    if s.is_infinite() {
        "+Inf".into()
    } else if s < 1e-3 {
        format!("{:.0}µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

fn to_table(m: &Exposition) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (series, label, _) in DAEMON {
        let _ = writeln!(out, "{:<24}{}", label, fmt_num(m.one(series)));
    }
    let ctl = m.by("cc_proxy_ctl_transactions_total", "result");
    let (count, mean, p50, p99) = ctl_summary(m);
    let results: Vec<String> = ctl
        .iter()
        .map(|(r, n)| format!("{r} {}", fmt_num(Some(*n))))
        .collect();
    let _ = writeln!(
        out,
        "{:<24}{} ({})",
        "ctl transactions",
        fmt_num(Some(count)),
        results.join(", ")
    );
    if let Some(mean) = mean {
        let bound = |q: Option<f64>| q.map(|b| format!("≤ {}", fmt_secs(b))).unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<24}mean {}, p50 {}, p99 {}",
            "ctl round trip",
            fmt_secs(mean),
            bound(p50),
            bound(p99)
        );
    }
    let errors: Vec<String> = m
        .by("cc_proxy_errors_total", "kind")
        .into_iter()
        .filter(|(_, n)| *n > 0.0)
        .map(|(k, n)| format!("{k} {}", fmt_num(Some(n))))
        .collect();
    let errors = if errors.is_empty() {
        "none".to_owned()
    } else {
        errors.join(", ")
    };
    let _ = writeln!(out, "{:<24}{errors}", "errors");
    let rows = vm_rows(m);
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no VMs running\n");
        return out;
    }
    let mut table: Vec<Vec<String>> = vec![std::iter::once("CONTAINER")
        .chain(VM_COLUMNS.iter().map(|c| c.1))
        .map(str::to_owned)
        .collect()];
    for (id, vals) in &rows {
        table.push(
            std::iter::once(id.escape_debug().to_string())
                .chain(vals.iter().map(|v| fmt_num(*v)))
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

fn to_json(m: &Exposition) -> Value {
    let mut o = serde_json::Map::new();
    for (series, _, key) in DAEMON {
        o.insert(key.into(), m.one(series).map(num).unwrap_or(Value::Null));
    }
    let pairs = |name: &str, label: &str| -> Value {
        Value::Object(
            m.by(name, label)
                .into_iter()
                .map(|(k, v)| (k, num(v)))
                .collect(),
        )
    };
    o.insert("errors".into(), pairs("cc_proxy_errors_total", "kind"));
    let (count, mean, p50, p99) = ctl_summary(m);
    o.insert(
        "ctl".into(),
        json!({
            "transactions": pairs("cc_proxy_ctl_transactions_total", "result"),
            "round_trips": num(count),
            "round_trip_sum_seconds": m.one("cc_proxy_ctl_round_trip_seconds_sum").unwrap_or(0.0),
            "round_trip_mean_seconds": mean,
            "round_trip_p50_at_most_seconds": p50.filter(|b| b.is_finite()),
            "round_trip_p99_at_most_seconds": p99.filter(|b| b.is_finite()),
        }),
    );
    let vms: Vec<Value> = vm_rows(m)
        .into_iter()
        .map(|(id, vals)| {
            let mut v = serde_json::Map::new();
            v.insert("container_id".into(), Value::String(id));
            for ((_, _, key), val) in VM_COLUMNS.iter().zip(vals) {
                v.insert((*key).into(), val.map(num).unwrap_or(Value::Null));
            }
            Value::Object(v)
        })
        .collect();
    o.insert("vm".into(), Value::Array(vms));
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP cc_proxy_vms x\n\
        cc_proxy_vms 2\n\
        cc_proxy_errors_total{kind=\"refused\"} 3\n\
        cc_proxy_errors_total{kind=\"timeout\"} 0\n\
        cc_proxy_vm_sessions{container_id=\"a \\\"b\\\"\\\\\\n}\"} 4\n\
        cc_proxy_ctl_round_trip_seconds_bucket{le=\"0.001\"} 1\n\
        cc_proxy_ctl_round_trip_seconds_bucket{le=\"+Inf\"} 2\n\
        cc_proxy_ctl_round_trip_seconds_count 2\n\
        cc_proxy_ctl_round_trip_seconds_sum 3.0005\n";

    #[test]
    fn the_exposition_is_read_with_its_escapes() {
        let m = Exposition::parse(TEXT).unwrap();
        assert_eq!(m.one("cc_proxy_vms"), Some(2.0));
        assert_eq!(
            m.by("cc_proxy_vm_sessions", "container_id"),
            vec![("a \"b\"\\\n}".to_string(), 4.0)]
        );
        let (count, mean, p50, p99) = ctl_summary(&m);
        assert_eq!((count, p50, p99), (2.0, Some(0.001), Some(f64::INFINITY)));
        assert!((mean.unwrap() - 1.50025).abs() < 1e-9);
        assert!(Exposition::parse("cc_proxy_vms{kind=\"x} 1").is_err());
        assert!(Exposition::parse("cc_proxy_vms").is_err());
    }

    #[test]
    fn the_table_escapes_container_ids_and_hides_zero_errors() {
        let t = to_table(&Exposition::parse(TEXT).unwrap());
        assert!(t.contains("errors                  refused 3\n"), "{t}");
        assert!(t.contains("a \\\"b\\\"\\\\\\n}"), "{t}");
        assert_eq!(t.lines().filter(|l| l.contains('}')).count(), 1, "{t}");
        let j = to_json(&Exposition::parse(TEXT).unwrap());
        assert_eq!(j["vm"][0]["container_id"], "a \"b\"\\\n}");
        assert_eq!(j["vm"][0]["sessions"], 4);
        assert_eq!(j["errors"]["refused"], 3);
        assert_eq!(j["tokens"], Value::Null);
    }
}
