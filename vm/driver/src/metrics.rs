//! Reads Prometheus text from `http://ADDR/metrics` (a plain HTTP/1.1 GET over loopback,
//! bounded by timeouts) and answers the few questions the checks ask: a counter's sum
//! over all series, and its values grouped by one label.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

const TIMEOUT: Duration = Duration::from_secs(20);

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Sum over every series of `name`; `None` if the metric is not on the page.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut it = self.samples.iter().filter(|s| s.name == name).peekable();
        it.peek()?;
        Some(it.map(|s| s.value).sum())
    }

    /// Values of `name` summed per value of `label` (series without it count as `""`).
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            let v = s.labels.iter().find(|(k, _)| k == label).map(|(_, v)| v.clone()).unwrap_or_default();
            *out.entry(v).or_insert(0.0) += s.value;
        }
        out
    }
}

/// `GET /metrics` from `addr` (numeric `ip:port`).
pub fn scrape(addr: &str) -> Result<Metrics> {
    let sa: SocketAddr = addr.parse().with_context(|| format!("{addr:?} is not a numeric address"))?;
    let mut s = TcpStream::connect_timeout(&sa, TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    // One write: the agent's responder answers after its first read.
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).with_context(|| format!("reading the response from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("no HTTP header end in {text:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        bail!("http://{addr}/metrics answered {status:?}");
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_owned() };
    Ok(parse(&body))
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("truncated chunked body")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).context("truncated chunk")?);
        body = rest.get(size..).and_then(|r| r.strip_prefix("\r\n")).context("chunk without CRLF")?;
    }
}

/// Parses the Prometheus text format (comments and malformed lines are skipped).
pub fn parse(text: &str) -> Metrics {
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(s) = parse_line(line) {
            samples.push(s);
        }
    }
    Metrics { samples }
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices();
        let (mut key, mut val, mut in_val, mut escaped) = (String::new(), String::new(), false, false);
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if in_val {
                if escaped {
                    val.push(if c == 'n' { '\n' } else { c });
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    labels.push((std::mem::take(&mut key).trim().to_owned(), std::mem::take(&mut val)));
                    in_val = false;
                } else {
                    val.push(c);
                }
            } else {
                match c {
                    '}' => {
                        end = Some(i);
                        break;
                    }
                    '=' => {
                        if chars.next()?.1 != '"' {
                            return None;
                        }
                        in_val = true;
                    }
                    ',' => {}
                    c => key.push(c),
                }
            }
        }
        rest = &r[end? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_with_labels() {
        let m = parse(
            "# TYPE sluice_relay_streams_opened_total counter\n\
             sluice_relay_streams_opened_total{resource=\"res_1\",path=\"ktls_splice\"} 3\n\
             sluice_relay_streams_opened_total{resource=\"res_2\",path=\"userspace\"} 1\n\
             sluice_relay_userspace_copy_bytes_total 0\n\
             odd{a=\"x\\\"y}\"} 2.5\n",
        );
        let by = m.by_label("sluice_relay_streams_opened_total", "path");
        assert_eq!(by.get("ktls_splice"), Some(&3.0));
        assert_eq!(by.get("userspace"), Some(&1.0));
        assert_eq!(m.sum("sluice_relay_streams_opened_total"), Some(4.0));
        assert_eq!(m.sum("sluice_relay_userspace_copy_bytes_total"), Some(0.0));
        assert_eq!(m.sum("missing"), None);
        assert_eq!(m.samples[3].labels, [("a".to_owned(), "x\"y}".to_owned())]);
        assert_eq!(m.samples[3].value, 2.5);
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").unwrap(), "hello world");
    }
}
