//! The relays this agent holds sessions to. A cluster of relays shares one store; each
//! relay tells its agents the active set (in the welcome and on every change), and the
//! agent keeps one control session and one pool of data connections to each of them (up
//! to `SLUICE_MAX_RELAYS`), following the set without a restart:
//!
//! - it starts with the URL it was given (the JWT's relay URL or `SLUICE_URL`: for a
//!   cluster, one DNS name or load balancer in front of every relay — the *entry*);
//! - once a relay has listed the set, it holds a session to each chosen relay at the URL
//!   that relay advertises (its `--public-url`); the entry session is kept when the
//!   entry is one of those URLs, else closed once a listed relay answers;
//! - a relay that leaves the set (drained, or silent and dropped) loses its session
//!   (streams under way finish); a new one gets a session within seconds;
//! - when no relay has answered for [`FALLBACK_AFTER`], it dials the entry again.
//!
//! Each relay's session reconnects on its own with backoff; the certificate is shared, so
//! a revocation seen by any session ends all of them and the agent enrolls again.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use sluice_proto::relay_url::RelayUrl;
use sluice_proto::wire::RelayPeer;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::enroll::Identity;
use crate::session::{self, Parts, PeerReport, SessionEnd};

/// With no session up for this long, the entry URL is dialed again (to learn the set anew).
pub const FALLBACK_AFTER: Duration = Duration::from_secs(15);

/// What the relay loops tell the supervisor.
enum Event {
    /// A session came up (or its relay sent a new list).
    Report(PeerReport),
    /// The session to this URL ended (its loop retries unless stopped).
    Down(String),
    /// A session ended in a way every session shares (revoked or due for renewal).
    Fatal(SessionEnd),
}

/// One relay loop: a session to `url`, reconnected with backoff until `stop`.
struct Loop {
    stop: CancellationToken,
    up: bool,
    /// The relay it last reached.
    relay_id: Option<String>,
}

/// Holds sessions to the cluster's relays until the agent shuts down (`Shutdown`) or a
/// session finds the certificate revoked or due for renewal (that end, every session
/// stopped).
pub async fn run(parts: &Parts, id: Identity, shutdown: &CancellationToken) -> SessionEnd {
    let entry = parts.cfg.relay_url.clone();
    let max = parts.cfg.max_relays as usize;
    // Every agent of one resource ranks the relays alike: a job finds all of them there.
    let key = id.meta.resource_id.clone();
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut loops: HashMap<String, Loop> = HashMap::new();
    let mut latest: Option<Vec<RelayPeer>> = None;
    let mut last_up = Instant::now();
    let spawn = |url: &RelayUrl, loops: &mut HashMap<String, Loop>| {
        let stop = shutdown.child_token();
        loops.insert(url.to_string(), Loop { stop: stop.clone(), up: false, relay_id: None });
        tokio::spawn(relay_loop(parts.clone(), url.clone(), id.clone(), stop, events_tx.clone()));
    };
    spawn(&entry, &mut loops);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            e = events.recv() => match e {
                Some(Event::Report(r)) => {
                    if let Some(l) = loops.get_mut(&r.dialed.to_string()) {
                        l.up = true;
                        l.relay_id = Some(r.relay_id.clone());
                    }
                    if !r.relays.is_empty() && latest.as_ref() != Some(&r.relays) {
                        info!(relays = %describe(&r.relays), from = %r.relay_id, "the cluster's relays");
                        latest = Some(r.relays);
                    }
                }
                Some(Event::Down(url)) => {
                    if let Some(l) = loops.get_mut(&url) {
                        l.up = false;
                    }
                }
                Some(Event::Fatal(end)) => {
                    for l in loops.values() {
                        l.stop.cancel();
                    }
                    return end;
                }
                None => return SessionEnd::Shutdown,
            },
            _ = check.tick() => {}
        }
        if loops.values().any(|l| l.up) {
            last_up = Instant::now();
        }
        let wanted = chosen(&entry, latest.as_deref(), max, &key);
        let plan = reconcile(&entry, &wanted, &loops, last_up.elapsed() >= FALLBACK_AFTER);
        for url in plan.stop {
            if let Some(l) = loops.remove(&url.to_string()) {
                info!(relay = %url, "no longer in the set of relays to hold: closing its session (streams under way \
                       finish)");
                l.stop.cancel();
            }
        }
        for url in plan.start {
            info!(relay = %url, "holding a session to this relay too");
            spawn(&url, &mut loops);
        }
    }
}

/// Reconnects the session to one relay until `stop`; reports ups and downs.
async fn relay_loop(
    parts: Parts,
    url: RelayUrl,
    id: Identity,
    stop: CancellationToken,
    events: mpsc::UnboundedSender<Event>,
) {
    let (peers_tx, mut peers_rx) = mpsc::unbounded_channel::<PeerReport>();
    let forward = {
        let events = events.clone();
        async move {
            while let Some(r) = peers_rx.recv().await {
                let _ = events.send(Event::Report(r));
            }
        }
    };
    tokio::spawn(forward);
    let mut backoff = Backoff::new(Duration::from_millis(200), parts.cfg.reconnect_max);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let end = session::run(&parts, &url, id.clone(), &stop, &peers_tx).await;
        let _ = events.send(Event::Down(url.to_string()));
        if !matches!(end, SessionEnd::Shutdown) {
            crate::metrics::reconnect();
        }
        let why = match end {
            SessionEnd::Shutdown => return,
            SessionEnd::Revoked(_) | SessionEnd::Renew => {
                let _ = events.send(Event::Fatal(end));
                return;
            }
            SessionEnd::Ended(why) => {
                backoff.reset();
                why
            }
            SessionEnd::Lost(why) => why,
        };
        let d = backoff.next_delay();
        crate::metrics::relay_unreachable(&why);
        warn!(relay = %url, reason = %why, retry_in = ?d, "relay unreachable; will retry");
        tokio::select! { _ = tokio::time::sleep(d) => {}, _ = stop.cancelled() => return }
    }
}

/// The relays to hold sessions to: the entry alone until a relay lists the set; then up
/// to `max` of the listed relays, the entry first when it is one of them, the others
/// ranked by a hash of `key` and the relay's URL (rendezvous hashing; `key` is the
/// resource's id, so every agent of a resource picks the same relays, resources spread
/// over a larger cluster, and one relay joining or leaving moves only the resources that
/// chose it).
fn chosen(entry: &RelayUrl, listed: Option<&[RelayPeer]>, max: usize, key: &str) -> Vec<(RelayUrl, String)> {
    let Some(listed) = listed.filter(|l| !l.is_empty()) else {
        return vec![(entry.clone(), String::new())];
    };
    let mut urls: Vec<(RelayUrl, String)> = listed
        .iter()
        .filter_map(|p| match RelayUrl::parse(&p.url) {
            Ok(u) => Some((u, p.id.clone())),
            Err(e) => {
                warn!(relay = %p.id, url = %p.url, error = %e, "a relay advertises a URL that does not parse: \
                       skipped; set its --public-url to https://HOST:PORT");
                None
            }
        })
        .collect();
    // The URL the agent was given comes first when it is one of the relays (it is what
    // the operator chose); the rest by rendezvous weight.
    urls.sort_by_key(|(u, _)| (u != entry, std::cmp::Reverse(rank(key, &u.to_string()))));
    urls.dedup_by(|a, b| a.0 == b.0);
    urls.truncate(max.max(1));
    urls
}

/// Rendezvous weight of `url` for the agent `key`.
fn rank(key: &str, url: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, url).hash(&mut h);
    h.finish()
}

/// What to start and stop.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    start: Vec<RelayUrl>,
    stop: Vec<RelayUrl>,
}

/// Moves the running loops towards `wanted`. The entry loop, when not wanted itself, is
/// kept until another relay's session is up (never left with none), and the relay it
/// reached gets its own loop only once it is closed (no two sessions of this agent on one
/// relay). With no session up for [`FALLBACK_AFTER`] (`stale`) the entry is dialed again.
fn reconcile(entry: &RelayUrl, wanted: &[(RelayUrl, String)], loops: &HashMap<String, Loop>, stale: bool) -> Plan {
    let entry_key = entry.to_string();
    let mut plan = Plan::default();
    let entry_wanted = wanted.iter().any(|(u, _)| u.to_string() == entry_key);
    let entry_loop = loops.get(&entry_key);
    let others_up = loops.iter().any(|(k, l)| *k != entry_key && l.up);
    let wanted_urls: Vec<String> = wanted.iter().map(|(u, _)| u.to_string()).collect();
    // The relay the (unwanted) entry session holds, if it is to stay open for now.
    let mut held_by_entry = None;
    if let Some(l) = entry_loop
        && !entry_wanted
    {
        if others_up {
            plan.stop.push(entry.clone());
        } else {
            held_by_entry = l.relay_id.clone();
        }
    }
    for (k, _) in loops.iter().filter(|(k, _)| **k != entry_key && !wanted_urls.contains(k)) {
        if let Ok(u) = RelayUrl::parse(k) {
            plan.stop.push(u);
        }
    }
    for (u, id) in wanted {
        let k = u.to_string();
        // Not twice, and not the relay the entry session holds until that one is closed.
        if loops.contains_key(&k) || held_by_entry.as_ref() == Some(id) {
            continue;
        }
        plan.start.push(u.clone());
    }
    if stale && entry_loop.is_none() && !wanted_urls.contains(&entry_key) {
        warn!(entry = %entry, "no relay of the set has answered for {FALLBACK_AFTER:?}: dialing the entry URL again");
        plan.start.push(entry.clone());
    }
    plan
}

/// `id=url` pairs for the log.
fn describe(relays: &[RelayPeer]) -> String {
    relays.iter().map(|p| format!("{}={}", p.id, p.url)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> RelayUrl {
        RelayUrl::parse(s).unwrap()
    }

    fn peers(n: usize) -> Vec<RelayPeer> {
        (1..=n).map(|i| RelayPeer { id: format!("rly_{i}"), url: format!("https://relay-{i}.example:443") }).collect()
    }

    fn running(entries: &[(&str, bool, Option<&str>)]) -> HashMap<String, Loop> {
        entries
            .iter()
            .map(|(u, up, id)| {
                let l = Loop { stop: CancellationToken::new(), up: *up, relay_id: id.map(str::to_owned) };
                (url(u).to_string(), l)
            })
            .collect()
    }

    #[test]
    fn the_entry_alone_until_a_relay_lists_the_set_then_at_most_max() {
        let entry = url("https://relays.example");
        assert_eq!(chosen(&entry, None, 4, "agt_a"), [(entry.clone(), String::new())]);
        assert_eq!(chosen(&entry, Some(&[]), 4, "agt_a").len(), 1, "an older relay lists nothing");
        assert_eq!(chosen(&entry, Some(&peers(3)), 4, "agt_a").len(), 3);
        assert_eq!(chosen(&entry, Some(&peers(9)), 4, "agt_a").len(), 4);
        let third = url("https://relay-3.example");
        for a in 0..20 {
            let only = chosen(&third, Some(&peers(5)), 1, &format!("agt_{a}"));
            assert_eq!(only, [(third.clone(), "rly_3".to_owned())], "the given URL first when it is a relay");
        }
    }

    #[test]
    fn resources_spread_over_a_larger_cluster_and_a_leaving_relay_moves_only_its_resources() {
        let entry = url("https://relays.example");
        let all = peers(8);
        let mut load: HashMap<String, usize> = HashMap::new();
        for a in 0..400 {
            for (u, _) in chosen(&entry, Some(&all), 2, &format!("res_{a}")) {
                *load.entry(u.to_string()).or_default() += 1;
            }
        }
        assert_eq!(load.len(), 8, "every relay gets resources");
        assert!(load.values().all(|&n| n > 40), "spread: {load:?}");
        let without_3: Vec<_> = all.iter().filter(|p| p.id != "rly_3").cloned().collect();
        for a in 0..200 {
            let key = format!("res_{a}");
            let before = chosen(&entry, Some(&all), 2, &key);
            let after = chosen(&entry, Some(&without_3), 2, &key);
            let kept = before.iter().filter(|(_, id)| id != "rly_3").all(|b| after.contains(b));
            assert!(kept, "resource {key}: {before:?} -> {after:?}");
        }
    }

    #[test]
    fn the_entry_session_stays_until_another_is_up_and_its_relay_is_not_dialed_twice() {
        let entry = url("https://relays.example");
        let wanted = chosen(&entry, Some(&peers(3)), 4, "agt_a");
        // The entry reached rly_2; nothing else up yet: keep it, dial rly_1 and rly_3 only.
        let loops = running(&[("https://relays.example", true, Some("rly_2"))]);
        let plan = reconcile(&entry, &wanted, &loops, false);
        assert!(plan.stop.is_empty(), "{plan:?}");
        let mut started: Vec<String> = plan.start.iter().map(|u| u.host.clone()).collect();
        started.sort();
        assert_eq!(started, ["relay-1.example", "relay-3.example"]);
        // rly_1 answered: close the entry session; rly_2 is dialed at its own URL next round.
        let loops = running(&[
            ("https://relays.example", true, Some("rly_2")),
            ("https://relay-1.example", true, Some("rly_1")),
            ("https://relay-3.example", false, None),
        ]);
        let plan = reconcile(&entry, &wanted, &loops, false);
        assert_eq!(plan.stop, vec![entry.clone()]);
        let loops =
            running(&[("https://relay-1.example", true, Some("rly_1")), ("https://relay-3.example", false, None)]);
        assert_eq!(reconcile(&entry, &wanted, &loops, false).start, [url("https://relay-2.example")]);
    }

    #[test]
    fn a_relay_that_leaves_the_set_loses_its_session_and_silence_brings_back_the_entry() {
        let entry = url("https://relay-1.example");
        let loops = running(&[
            ("https://relay-1.example", true, Some("rly_1")),
            ("https://relay-2.example", true, Some("rly_2")),
        ]);
        let only_1 = chosen(&entry, Some(&peers(1)), 4, "agt_a");
        let plan = reconcile(&entry, &only_1, &loops, false);
        assert_eq!(plan, Plan { start: vec![], stop: vec![url("https://relay-2.example")] });
        // The entry is one of the set's URLs: it is simply that relay's session.
        let all = chosen(&entry, Some(&peers(2)), 4, "agt_a");
        assert_eq!(reconcile(&entry, &all, &loops, false), Plan::default());
        // Nothing answered for a while and the entry is not among the loops: dial it.
        let gone = running(&[("https://relay-5.example", false, None)]);
        let elsewhere = vec![(url("https://relay-5.example"), "rly_5".to_owned())];
        assert_eq!(reconcile(&entry, &elsewhere, &gone, true).start, vec![entry.clone()]);
        assert!(reconcile(&entry, &elsewhere, &gone, false).start.is_empty());
    }
}
