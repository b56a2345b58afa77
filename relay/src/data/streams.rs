//! Live streams: what every open stream is, how many bytes it moved and how fast, for
//! `sluice streams` and the admin API.
//!
//! The relay counts the bytes it copies itself; the agent reports its own counts (from
//! its eBPF program or its user-space copy) over the control session about once a
//! second. A stream shows the agent's counts when they have arrived, else the relay's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sluice_datapath::{PathKind, Transfer};
use sluice_proto::wire::StreamStat;
use tokio_util::sync::CancellationToken;

/// One open stream.
pub struct LiveStream {
    pub id: u64,
    pub resource_id: String,
    pub resource_name: String,
    pub agent_id: String,
    pub client_addr: String,
    pub started: Instant,
    pub started_at: u64,
    /// The relay's own counts: plain→tunnel is client→service ("in").
    pub transfer: Arc<Transfer>,
    agent_report: Mutex<Option<StreamStat>>,
    /// (bytes in, bytes out) per second, from the last sampling interval.
    rate: Mutex<(f64, f64)>,
    last_sample: Mutex<(Instant, u64, u64)>,
    /// Relay-side bytes already added to the Prometheus counters.
    metered: Mutex<(u64, u64)>,
    /// How long the stream lasted, once closed.
    ended: Mutex<Option<Duration>>,
}

/// A stream as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamView {
    pub stream_id: u64,
    pub resource_id: String,
    pub resource_name: String,
    pub agent_id: String,
    pub client_addr: String,
    pub started_at: u64,
    pub age_secs: f64,
    /// Bytes client → private service.
    pub bytes_in: u64,
    /// Bytes private service → client.
    pub bytes_out: u64,
    pub rate_in_bps: f64,
    pub rate_out_bps: f64,
    /// Data path of the agent's side (`userspace` until the agent reports).
    pub path: PathKind,
    /// Who counted the bytes: `ebpf` or `userspace` (the agent), or `relay`.
    pub counter: String,
    pub closed: bool,
    /// The agent's final counts are in: its report marked closed arrived. A stream the
    /// relay has closed shows the agent's last periodic counts until then (the agent
    /// waits for the service to acknowledge its last bytes before it reports), so a
    /// script that needs exact totals waits for this.
    #[serde(default)]
    pub final_counts: bool,
    /// TLS bytes (received, sent) on the agent's tunnel socket, when counted by eBPF.
    pub tunnel_bytes: Option<(u64, u64)>,
}

/// How many closed streams are kept for `sluice streams --closed`.
pub const RECENT_CLOSED: usize = 1000;

/// Every open stream of this relay, and the most recently closed ones (whose final
/// agent reports may still arrive).
#[derive(Default)]
pub struct Streams {
    live: Mutex<HashMap<u64, Arc<LiveStream>>>,
    recent: Mutex<std::collections::VecDeque<Arc<LiveStream>>>,
}

impl Streams {
    /// Registers a stream that just started.
    pub fn open(
        &self,
        id: u64,
        resource_id: &str,
        resource_name: &str,
        agent_id: &str,
        client_addr: &str,
    ) -> Arc<LiveStream> {
        let s = Arc::new(LiveStream {
            id,
            resource_id: resource_id.into(),
            resource_name: resource_name.into(),
            agent_id: agent_id.into(),
            client_addr: client_addr.into(),
            started: Instant::now(),
            started_at: sluice_proto::identity::unix_now(),
            transfer: Arc::new(Transfer::default()),
            agent_report: Mutex::new(None),
            rate: Mutex::new((0.0, 0.0)),
            last_sample: Mutex::new((Instant::now(), 0, 0)),
            metered: Mutex::new((0, 0)),
            ended: Mutex::new(None),
        });
        self.live.lock().insert(id, s.clone());
        s
    }

    /// How many streams are open now (a drain waits for 0).
    pub fn live_count(&self) -> usize {
        self.live.lock().len()
    }

    pub fn close(&self, id: u64) {
        if let Some(s) = self.live.lock().remove(&id) {
            s.flush_metrics();
            *s.rate.lock() = (0.0, 0.0);
            *s.ended.lock() = Some(s.started.elapsed());
            let mut recent = self.recent.lock();
            if recent.len() == RECENT_CLOSED {
                recent.pop_front();
            }
            recent.push_back(s);
        }
    }

    /// Takes an agent's report; counts only for streams of that agent.
    pub fn report(&self, agent_id: &str, stats: &[StreamStat]) {
        let live = self.live.lock();
        for st in stats {
            let s = match live.get(&st.stream_id) {
                Some(s) => Some(s.clone()),
                None if st.closed => self.recent.lock().iter().rev().find(|s| s.id == st.stream_id).cloned(),
                None => None,
            };
            if let Some(s) = s.filter(|s| s.agent_id == agent_id) {
                let mut current = s.agent_report.lock();
                // A periodic report taken just before the stream ended can arrive after
                // the final one: it must not replace the final counts.
                if !current.as_ref().is_some_and(|c| c.closed && !st.closed) {
                    *current = Some(st.clone());
                }
            }
        }
    }

    /// Updates every stream's rate from its counts since the last sample.
    pub fn sample_rates(&self) {
        let now = Instant::now();
        for s in self.live.lock().values() {
            let (bin, bout) = s.bytes();
            let mut last = s.last_sample.lock();
            let dt = now.duration_since(last.0).as_secs_f64();
            if dt > 0.0 {
                *s.rate.lock() = ((bin.saturating_sub(last.1)) as f64 / dt, (bout.saturating_sub(last.2)) as f64 / dt);
            }
            *last = (now, bin, bout);
            drop(last);
            s.flush_metrics();
        }
    }

    /// Samples rates every second until `stop`.
    pub async fn run_sampler(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample_rates(),
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Recently closed streams (with the agent's final counts once reported).
    pub fn closed_views(&self, resource: Option<&str>) -> Vec<StreamView> {
        self.recent
            .lock()
            .iter()
            .filter(|s| resource.is_none_or(|r| s.resource_name == r || s.resource_id == r))
            .map(|s| s.view())
            .collect()
    }

    pub fn views(&self, resource: Option<&str>) -> Vec<StreamView> {
        let mut v: Vec<StreamView> = self
            .live
            .lock()
            .values()
            .filter(|s| resource.is_none_or(|r| s.resource_name == r || s.resource_id == r))
            .map(|s| s.view())
            .collect();
        v.sort_by_key(|s| s.stream_id);
        v
    }
}

impl LiveStream {
    /// Adds the relay's bytes since the last flush to the Prometheus counters, so long
    /// streams show up in the totals while they run.
    fn flush_metrics(&self) {
        let (bin, bout) = self.transfer.get();
        let mut m = self.metered.lock();
        crate::metrics::bytes(&self.resource_id, bin - m.0, bout - m.1);
        *m = (bin, bout);
    }

    /// (in, out) bytes: the agent's counts if reported, else the relay's.
    fn bytes(&self) -> (u64, u64) {
        match &*self.agent_report.lock() {
            Some(r) => (r.bytes_in, r.bytes_out),
            None => self.transfer.get(),
        }
    }

    fn view(&self) -> StreamView {
        let report = self.agent_report.lock().clone();
        let (bytes_in, bytes_out) = self.bytes();
        let (rate_in_bps, rate_out_bps) = *self.rate.lock();
        let ended = *self.ended.lock();
        StreamView {
            stream_id: self.id,
            resource_id: self.resource_id.clone(),
            resource_name: self.resource_name.clone(),
            agent_id: self.agent_id.clone(),
            client_addr: self.client_addr.clone(),
            started_at: self.started_at,
            age_secs: ended.unwrap_or_else(|| self.started.elapsed()).as_secs_f64(),
            closed: ended.is_some(),
            final_counts: report.as_ref().is_some_and(|r| r.closed),
            tunnel_bytes: report.as_ref().and_then(|r| r.tunnel_bytes),
            bytes_in,
            bytes_out,
            rate_in_bps,
            rate_out_bps,
            path: report.as_ref().map(|r| r.path).unwrap_or(PathKind::Userspace),
            counter: match report.map(|r| r.counter) {
                Some(sluice_proto::wire::CounterSource::Ebpf) => "ebpf".into(),
                Some(sluice_proto::wire::CounterSource::Userspace) => "userspace".into(),
                Some(sluice_proto::wire::CounterSource::Other) => "other".into(),
                None => "relay".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::wire::CounterSource;
    use std::sync::atomic::Ordering;

    #[test]
    fn agent_reports_replace_relay_counts_only_for_its_own_streams() {
        let streams = Streams::default();
        let s = streams.open(1, "res_1", "db", "agt_a", "1.2.3.4:5");
        s.transfer.plain_to_tunnel.store(10, Ordering::Relaxed);
        assert_eq!(streams.views(None)[0].counter, "relay");
        assert_eq!(streams.views(None)[0].bytes_in, 10);
        let stat = StreamStat {
            stream_id: 1,
            bytes_in: 11,
            bytes_out: 22,
            path: PathKind::Userspace,
            counter: CounterSource::Ebpf,
            closed: false,
            tunnel_bytes: None,
        };
        streams.report("agt_other", std::slice::from_ref(&stat));
        assert_eq!(streams.views(None)[0].counter, "relay", "another agent cannot report for this stream");
        streams.report("agt_a", &[stat]);
        let v = &streams.views(Some("db"))[0];
        assert_eq!((v.bytes_in, v.bytes_out, v.counter.as_str()), (11, 22, "ebpf"));
        assert!(streams.views(Some("other")).is_empty());
        streams.close(1);
        assert!(streams.views(None).is_empty());
    }

    #[test]
    fn a_late_periodic_report_does_not_undo_the_final_one() {
        let streams = Streams::default();
        streams.open(1, "res_1", "db", "agt_a", "1.2.3.4:5");
        let stat = |bytes_in, closed| StreamStat {
            stream_id: 1,
            bytes_in,
            bytes_out: 0,
            path: PathKind::KtlsSplice,
            counter: CounterSource::Ebpf,
            closed,
            tunnel_bytes: None,
        };
        streams.report("agt_a", &[stat(60, false)]);
        assert!(!streams.views(None)[0].final_counts, "a periodic report is not final");
        streams.report("agt_a", &[stat(100, true)]);
        streams.report("agt_a", &[stat(60, false)]);
        let v = &streams.views(None)[0];
        assert_eq!((v.bytes_in, v.path, v.final_counts), (100, PathKind::KtlsSplice, true));
    }

    #[test]
    fn rates_come_from_the_last_interval() {
        let streams = Streams::default();
        let s = streams.open(1, "r", "n", "a", "c");
        *s.last_sample.lock() = (Instant::now() - Duration::from_secs(2), 0, 0);
        s.transfer.plain_to_tunnel.store(2000, Ordering::Relaxed);
        streams.sample_rates();
        let v = &streams.views(None)[0];
        assert!((v.rate_in_bps - 1000.0).abs() < 50.0, "{}", v.rate_in_bps);
        assert_eq!(v.rate_out_bps, 0.0);
    }
}
