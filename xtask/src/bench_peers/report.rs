//! The results of `cargo xtask bench-peers` as Markdown: the machine, two tables of
//! median (min–max) per tunnel (bulk transfer and memory; new streams and small
//! messages), Sluice's ratio to each peer, and the notes; and the
//! section of `docs/benchmarks.md` between the bench-peers markers that holds them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use super::peers::Peer;

pub const BEGIN: &str = "<!-- bench-peers:begin -->";
pub const END: &str = "<!-- bench-peers:end -->";

/// One measured quantity of a tunnel.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Metric {
    Up1,
    Down1,
    Up8,
    Down8,
    CpuPerGib,
    LatencyP50,
    LatencyP99,
    RssIdle,
    RssOpen,
    /// Sustained new streams: completed connect + echo + close cycles per second.
    ConnRate,
    /// Connect + echo p50 and p99 under that load, µs.
    ConnRateP50,
    ConnRateP99,
    /// Failed cycles under that load.
    ConnFailed,
    /// `pgbench -S` transactions per second against PostgreSQL through the tunnel.
    PgTps,
}

impl Metric {
    /// Bulk transfer, CPU, latency and memory: the first table.
    pub const BULK: [Metric; 9] = [
        Metric::Up1,
        Metric::Down1,
        Metric::Up8,
        Metric::Down8,
        Metric::CpuPerGib,
        Metric::LatencyP50,
        Metric::LatencyP99,
        Metric::RssIdle,
        Metric::RssOpen,
    ];

    /// Many short connections and small messages: the second table.
    pub const SMALL: [Metric; 5] =
        [Metric::ConnRate, Metric::ConnRateP50, Metric::ConnRateP99, Metric::ConnFailed, Metric::PgTps];

    fn header(self, open_streams: usize) -> String {
        match self {
            Metric::Up1 => "1 stream →, Gbit/s".into(),
            Metric::Down1 => "1 stream ←, Gbit/s".into(),
            Metric::Up8 => "8 streams →, Gbit/s".into(),
            Metric::Down8 => "8 streams ←, Gbit/s".into(),
            Metric::CpuPerGib => "CPU-s/GiB".into(),
            Metric::LatencyP50 => "connect+echo p50, µs".into(),
            Metric::LatencyP99 => "p99, µs".into(),
            Metric::RssIdle => "agent RSS idle, MiB".into(),
            Metric::RssOpen => format!("agent RSS {open_streams} streams, MiB"),
            Metric::ConnRate => "new streams/s, 16 clients".into(),
            Metric::ConnRateP50 => "their connect+echo p50, µs".into(),
            Metric::ConnRateP99 => "p99, µs".into(),
            Metric::ConnFailed => "failed".into(),
            Metric::PgTps => "pgbench -S, 4 clients, tps".into(),
        }
    }

    fn format(self, v: f64) -> String {
        match self {
            Metric::LatencyP50 | Metric::LatencyP99 => format!("{v:.0}"),
            Metric::ConnRate | Metric::ConnRateP50 | Metric::ConnRateP99 | Metric::ConnFailed | Metric::PgTps => {
                format!("{v:.0}")
            }
            Metric::RssIdle | Metric::RssOpen => format!("{v:.1}"),
            _ => format!("{v:.2}"),
        }
    }
}

/// Everything measured for one tunnel over all repetitions.
#[derive(Default)]
pub struct PeerResults {
    /// Why the peer was not run at all (not installed, …).
    pub unavailable: Option<String>,
    pub values: BTreeMap<Metric, Vec<f64>>,
    /// Failures of single measurements, deduplicated, in order.
    pub errors: Vec<String>,
    /// TLS version and cipher suite seen by a probe, for peers that are probed.
    pub tls: Option<String>,
}

impl PeerResults {
    pub fn record(&mut self, metric: Metric, value: Result<f64>) {
        match value {
            Ok(v) => self.values.entry(metric).or_default().push(v),
            Err(e) => self.error(format!("{metric:?}: {e:#}")),
        }
    }

    pub fn error(&mut self, e: String) {
        if !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }

    fn median(&self, m: Metric) -> Option<f64> {
        self.values.get(&m).filter(|v| !v.is_empty()).map(|v| median(v))
    }

    fn cell(&self, m: Metric, peer: Peer) -> String {
        let Some(v) = self.values.get(&m).filter(|v| !v.is_empty()) else {
            let not_applicable =
                peer == Peer::Direct && matches!(m, Metric::CpuPerGib | Metric::RssIdle | Metric::RssOpen);
            return if not_applicable { "n/a".into() } else { "failed".into() };
        };
        let (lo, hi) = (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max));
        if v.len() == 1 {
            m.format(v[0])
        } else {
            format!("{} ({}–{})", m.format(median(v)), m.format(lo), m.format(hi))
        }
    }
}

/// Median of unsorted values (mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

/// A table of `metrics`: one row per tunnel.
pub fn results_table(results: &[(Peer, PeerResults)], metrics: &[Metric], open_streams: usize) -> String {
    let mut out = String::from("| tunnel | encryption |");
    for m in metrics {
        out += &format!(" {} |", m.header(open_streams));
    }
    out += &format!("\n|---|---|{}\n", "---:|".repeat(metrics.len()));
    for (peer, r) in results {
        match &r.tls {
            Some(tls) => out += &format!("| {} | {}; probe: {tls} |", peer.label(), peer.security()),
            None => out += &format!("| {} | {} |", peer.label(), peer.security()),
        }
        match &r.unavailable {
            Some(why) => out += &format!(" not available: {} |{}\n", one_line(why), " |".repeat(metrics.len() - 1)),
            None => {
                for &m in metrics {
                    out += &format!(" {} |", r.cell(m, *peer));
                }
                out.push('\n');
            }
        }
    }
    out
}

/// Sluice's median divided by each peer's median, per metric (not for failure counts).
pub fn ratio_table(results: &[(Peer, PeerResults)], metrics: &[Metric], open_streams: usize) -> Option<String> {
    let sluice = &results.iter().find(|(p, r)| *p == Peer::Sluice && r.unavailable.is_none())?.1;
    let metrics: Vec<Metric> = metrics.iter().copied().filter(|m| *m != Metric::ConnFailed).collect();
    let mut out = String::from("| Sluice ÷ |");
    for m in &metrics {
        out += &format!(" {} |", m.header(open_streams));
    }
    out += &format!("\n|---|{}\n", "---:|".repeat(metrics.len()));
    for (peer, r) in results.iter().filter(|(p, _)| *p != Peer::Sluice) {
        out += &format!("| {} |", peer.label());
        for &m in &metrics {
            let cell = match (sluice.median(m), r.median(m)) {
                _ if r.unavailable.is_some() => "–".to_owned(),
                (Some(s), Some(p)) if p > 0.0 => format!("{:.2}×", s / p),
                _ => "–".to_owned(),
            };
            out += &format!(" {cell} |");
        }
        out.push('\n');
    }
    Some(out)
}

/// Failures of single measurements, one bullet per peer and error.
pub fn notes(results: &[(Peer, PeerResults)]) -> String {
    let mut out = String::new();
    for (peer, r) in results {
        for e in &r.errors {
            out += &format!("- {}: {}\n", peer.label(), one_line(e));
        }
    }
    out
}

/// Table cells and bullets must stay on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "/")
}

/// Replaces the bench-peers section of `docs/benchmarks.md` (between the markers) with
/// `body`, or appends the section when the markers are not there yet.
pub fn write_docs(path: &Path, body: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let section = format!("{BEGIN}\n{}\n{END}", body.trim_end());
    let new = splice_section(&text, &section);
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

fn splice_section(text: &str, section: &str) -> String {
    match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{section}{}", &text[..b], &text[e + END.len()..]),
        _ => format!("{}\n\n{section}\n", text.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
    }

    #[test]
    fn section_is_appended_then_replaced() {
        let once = splice_section("# Benchmarks\n\nold text\n", &format!("{BEGIN}\nA\n{END}"));
        assert_eq!(once, format!("# Benchmarks\n\nold text\n\n{BEGIN}\nA\n{END}\n"));
        let twice = splice_section(&once, &format!("{BEGIN}\nB\n{END}"));
        assert_eq!(twice, format!("# Benchmarks\n\nold text\n\n{BEGIN}\nB\n{END}\n"));
    }

    #[test]
    fn small_message_table_and_ratios_leave_out_failure_counts() {
        let mut sluice = PeerResults::default();
        let mut bore = PeerResults::default();
        for (r, rate, tps) in [(&mut sluice, 2000.0, 12000.0), (&mut bore, 4000.0, 10000.0)] {
            r.record(Metric::ConnRate, Ok(rate));
            r.record(Metric::ConnRateP50, Ok(500.0));
            r.record(Metric::ConnRateP99, Ok(900.0));
            r.record(Metric::ConnFailed, Ok(0.0));
            r.record(Metric::PgTps, Ok(tps));
        }
        let results = vec![(Peer::Bore, bore), (Peer::Sluice, sluice)];
        let table = results_table(&results, &Metric::SMALL, 200);
        assert!(table.contains("| bore | **none: no encryption** | 4000 | 500 | 900 | 0 | 10000 |"), "{table}");
        let ratios = ratio_table(&results, &Metric::SMALL, 200).unwrap();
        assert!(!ratios.contains("failed"), "{ratios}");
        assert!(ratios.contains("| bore | 0.50× | 1.00× | 1.00× | 1.20× |"), "{ratios}");
    }

    #[test]
    fn cells_show_median_and_range() {
        let mut r = PeerResults::default();
        for v in [2.0, 1.0, 3.5] {
            r.record(Metric::Up1, Ok(v));
        }
        assert_eq!(r.cell(Metric::Up1, Peer::Socat), "2.00 (1.00–3.50)");
        assert_eq!(r.cell(Metric::RssIdle, Peer::Direct), "n/a");
        assert_eq!(r.cell(Metric::RssIdle, Peer::Socat), "failed");
    }
}
