//! Egress: the one place the agent opens a TCP connection to a relay — for enrollment,
//! the control session and every data connection — directly or through a corporate HTTP
//! forward proxy with `CONNECT`.
//!
//! Through a proxy, the agent asks it for a tunnel (`CONNECT relay:443 HTTP/1.1`, with
//! `Proxy-Authorization: Basic …` when the proxy URL carries credentials) and, once the
//! proxy answers 2xx, runs its pinned-CA mutual TLS end to end through that tunnel: the
//! proxy sees only ciphertext and the relay's name. The socket handed on is the TCP
//! socket to the proxy, so the byte meter and kernel TLS work on it as on a direct one.
//!
//! Which proxy ([`Proxy::select`]), in the order curl uses:
//! - `SLUICE_PROXY` (`--proxy`) wins; `none` or blank there means "never use a proxy",
//!   whatever else is set;
//! - else `https_proxy`, then `HTTPS_PROXY` (the relay is an `https://` URL). `ALL_PROXY`
//!   and `HTTP_PROXY` are not read: they are often SOCKS or meant for plain HTTP;
//! - `no_proxy`, else `NO_PROXY`, lists the hosts dialed directly (with any of the
//!   above): comma- or space-separated; `*` (everything); a domain, with or without a
//!   leading `.` or `*.`, matches itself and its subdomains; an IP address matches that
//!   address; a CIDR block (`10.0.0.0/8`) matches relay IP addresses inside it (names
//!   are not resolved for this); `host:port` matches that host on that port only.
//!
//! The proxy URL is `http://[user:password@]host[:port]` (credentials percent-decoded;
//! no scheme means `http://`); without a port, 1080 is used, as curl documents. An
//! `https://` proxy (TLS to the proxy itself) is refused at start-up, as is anything
//! that does not parse: the agent exits 2 naming the variable. Passwords never reach a
//! log or an error: the proxy is shown as `http://user:***@host:port` or without
//! credentials.
//!
//! The proxy's answer is read up to its blank line and not one byte further
//! ([`HeadReader`]), so nothing the relay sends after it can be lost; it is bounded in
//! size ([`MAX_HEAD`]) and time ([`RELAY_CONNECT_TIMEOUT`]).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use sluice_runtime::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::meter::{Meter, Registration};
use crate::session::stream::connect_metered;

/// How long the TCP connect to the relay (or to the proxy) may take, and, through a
/// proxy, how long its answer to `CONNECT` may take.
pub const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest answer head a proxy may send to `CONNECT` (status line and headers).
pub const MAX_HEAD: usize = 16 * 1024;

/// The port of a proxy URL without one: 1080, as curl documents for `http://` proxies.
pub const DEFAULT_PROXY_PORT: u16 = 1080;

// === impl Proxy ===

/// An HTTP forward proxy the agent reaches its relays through, and the hosts it skips.
#[derive(Clone)]
pub struct Proxy {
    /// Host name or IP (without brackets).
    host: String,
    port: u16,
    /// Percent-decoded user name and password.
    credentials: Option<(String, Secret<String>)>,
    /// The variable the URL came from, for messages.
    source: &'static str,
    no_proxy: NoProxy,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proxy({} from {}, no_proxy: {:?})", self.describe(), self.source, self.no_proxy.raw)
    }
}

/// `http://host:port`, without credentials (for error messages).
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", bracketed(&self.host, self.port))
    }
}

impl Proxy {
    /// The proxy to use from the agent's settings: `explicit` is `SLUICE_PROXY`
    /// (`--proxy`) if given, `env` looks up the standard variables (`https_proxy`,
    /// `HTTPS_PROXY`, `no_proxy`, `NO_PROXY`). `Ok(None)`: dial directly. The error is
    /// one line naming the variable and the fix (the password is never in it).
    pub fn select(explicit: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Proxy>, String> {
        let set = |var: &'static str| env(var).filter(|v| !v.trim().is_empty()).map(|v| (var, v));
        let chosen = match explicit {
            Some(v) if v.trim().is_empty() || v.trim().eq_ignore_ascii_case("none") => return Ok(None),
            Some(v) => Some(("SLUICE_PROXY", v.to_owned())),
            None => set("https_proxy").or_else(|| set("HTTPS_PROXY")),
        };
        let Some((source, url)) = chosen else { return Ok(None) };
        let mut proxy = Proxy::parse(source, &url)?;
        if let Some((var, list)) = set("no_proxy").or_else(|| set("NO_PROXY")) {
            proxy.no_proxy = NoProxy::parse(var, &list);
        }
        Ok(Some(proxy))
    }

    /// Parses `http://[user:password@]host[:port][/]` from variable `source`.
    pub fn parse(source: &'static str, value: &str) -> Result<Proxy, String> {
        let bad = |why: &str| {
            format!(
                "{source}={:?} is not a usable proxy URL: {why}; write http://[user:password@]host:port \
                 (or set SLUICE_PROXY=none to dial the relay directly)",
                redact(value.trim())
            )
        };
        let v = value.trim();
        let rest = match v.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(bad("a proxy reached over TLS (https://) is not supported: use the proxy's plain \
                     http:// address (the connection to the relay stays TLS end to end through it)"));
            }
            Some((scheme, _)) => return Err(bad(&format!("the scheme {scheme}:// is not supported (only http://)"))),
            None => v,
        };
        // What follows the authority (a path, "/") is ignored, as curl does.
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let credentials = match userinfo {
            None => None,
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let user = percent_decode(user).ok_or_else(|| bad("the user name has a broken %-escape"))?;
                let pass = percent_decode(pass).ok_or_else(|| bad("the password has a broken %-escape"))?;
                if user.is_empty() {
                    return Err(bad("the user name before ':' is empty"));
                }
                Some((user, Secret::new(pass)))
            }
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
        if host.is_empty() {
            return Err(bad("there is no host name"));
        }
        if host.chars().any(|c| c.is_whitespace() || c.is_control() || "@[]\\\"".contains(c)) {
            return Err(bad("the host name has characters a host name cannot have"));
        }
        Ok(Proxy {
            host: host.to_owned(),
            port: port.unwrap_or(DEFAULT_PROXY_PORT),
            credentials,
            source,
            no_proxy: NoProxy::default(),
        })
    }

    /// `http://user:***@host:port` (or without credentials): what the start-up log shows.
    pub fn describe(&self) -> String {
        match &self.credentials {
            Some((user, _)) => format!("http://{user}:***@{}", bracketed(&self.host, self.port)),
            None => self.to_string(),
        }
    }

    /// The variable the proxy URL came from (`SLUICE_PROXY`, `https_proxy`, `HTTPS_PROXY`).
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// The hosts dialed directly (`NO_PROXY`).
    pub fn no_proxy(&self) -> &NoProxy {
        &self.no_proxy
    }

    /// Whether a connection to `host:port` skips the proxy (`NO_PROXY`).
    pub fn bypasses(&self, host: &str, port: u16) -> bool {
        self.no_proxy.matches(host, port)
    }

    /// The `CONNECT` request for `authority` (`host:port`, brackets around IPv6).
    fn connect_request(&self, authority: &str) -> String {
        let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some((user, pass)) = &self.credentials {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", pass.expose()));
            req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        req.push_str(&format!("User-Agent: sluice-agent/{}\r\n\r\n", crate::VERSION));
        req
    }

    /// What to do about a refusal with `status`.
    fn hint(&self, status: u16) -> String {
        match status {
            // Some proxies (tinyproxy) answer wrong credentials with 401, not 407.
            401 | 407 if self.credentials.is_some() => {
                format!("the proxy did not accept the user name and password in {}: check them", self.source)
            }
            401 | 407 => "the proxy wants credentials: set user:password in SLUICE_PROXY/HTTPS_PROXY, e.g. \
                    http://user:password@host:port"
                .into(),
            403 | 405 => "the proxy's rules forbid this destination: ask its administrators to allow CONNECT to \
                          the relay's host and port (many proxies allow CONNECT to port 443 only)"
                .into(),
            502..=504 => "the proxy could not reach the relay: check that the relay is up and reachable from the \
                          proxy"
                .into(),
            _ => format!("check the proxy in {} or set NO_PROXY to dial the relay directly", self.source),
        }
    }
}

/// `host:port`, with brackets around an IPv6 host.
fn bracketed(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// Splits `host[:port]` or `[v6][:port]`; `None` when a port is there but not 1-65535.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            a => Some((host, Some(port(a.strip_prefix(':')?)?))),
        };
    }
    match s.rsplit_once(':') {
        Some((_, _)) if s.matches(':').count() > 1 => Some((s, None)), // a bare IPv6 address
        Some((host, p)) => Some((host, Some(port(p)?))),
        None => Some((s, None)),
    }
}

/// Decodes `%XX` escapes; `None` for a broken one or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A proxy URL as text with its password replaced by `***` (for messages about a URL
/// that did not parse).
fn redact(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => {
            let userinfo = &url[start..start + at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{}{user}:***{}", &url[..start], &url[start + at..])
        }
        None => url.to_owned(),
    }
}

// === impl NoProxy ===

/// The hosts dialed without the proxy (`NO_PROXY`).
#[derive(Clone, Default)]
pub struct NoProxy {
    /// The list as given (for the start-up log).
    raw: String,
    entries: Vec<(Pattern, Option<u16>)>,
}

#[derive(Clone, Debug, PartialEq)]
enum Pattern {
    All,
    /// Matches itself and its subdomains (lowercase, no leading or trailing dot).
    Domain(String),
    Ip(IpAddr),
    Cidr(IpAddr, u8),
}

impl NoProxy {
    /// Parses a `NO_PROXY` list (from `var`). Never fails: an entry that cannot match
    /// anything simply matches nothing.
    pub fn parse(_var: &str, list: &str) -> NoProxy {
        let entries = list
            .split([',', ' ', '\t'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter_map(|e| {
                if e == "*" {
                    return Some((Pattern::All, None));
                }
                if let Some((net, bits)) = e.split_once('/') {
                    let ip: IpAddr = net.trim_matches(['[', ']']).parse().ok()?;
                    let bits: u8 = bits.parse().ok()?;
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    return (bits <= max).then_some((Pattern::Cidr(ip, bits), None));
                }
                let (host, port) = split_host_port(e)?;
                let host = host.trim_start_matches("*.").trim_matches('.').to_ascii_lowercase();
                let pattern = match host.parse::<IpAddr>() {
                    Ok(ip) => Pattern::Ip(ip),
                    Err(_) if host.is_empty() => return None,
                    Err(_) => Pattern::Domain(host),
                };
                Some((pattern, port))
            })
            .collect();
        NoProxy { raw: list.trim().to_owned(), entries }
    }

    /// Whether `host:port` is on the list (names compared case-insensitively, IPs by
    /// value; names are not resolved).
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_matches(['[', ']']).trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.entries.iter().any(|(pattern, p)| {
            p.is_none_or(|p| p == port)
                && match pattern {
                    Pattern::All => true,
                    Pattern::Domain(d) => {
                        host == *d
                            || (host.len() > d.len() && host.ends_with(d.as_str()) && {
                                host.as_bytes()[host.len() - d.len() - 1] == b'.'
                            })
                    }
                    Pattern::Ip(want) => ip == Some(*want),
                    Pattern::Cidr(net, bits) => ip.is_some_and(|ip| in_cidr(ip, *net, *bits)),
                }
        })
    }

    /// The list as given (empty: none).
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for NoProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.raw)
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

// === impl HeadReader ===

/// Reads an HTTP response head (status line and headers, up to the blank line) without
/// reading past it: [`HeadReader::want`] says how many bytes may be read next (never
/// more than could still belong to the head), [`HeadReader::feed`] takes what was read.
/// No I/O here, so every split of an answer can be tested.
#[derive(Debug, Default)]
pub struct HeadReader {
    head: Vec<u8>,
}

/// A proxy's answer head that is not one (not HTTP, too long, cut short).
#[derive(Debug, Clone, PartialEq)]
pub struct NotHttp(pub String);

impl HeadReader {
    /// How many bytes may be read next: as many as could complete `\r\n\r\n` given
    /// what has been seen, so nothing after the head is consumed.
    pub fn want(&self) -> usize {
        let h = &self.head;
        let matched = (1..=3).rev().find(|n| h.len() >= *n && b"\r\n\r\n".starts_with(&h[h.len() - n..])).unwrap_or(0);
        4 - matched
    }

    /// Takes bytes read (at most [`want`](Self::want)); `Some(head)` once it is complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<String>, NotHttp> {
        self.head.extend_from_slice(bytes);
        let n = self.head.len().min(5);
        if self.head[..n] != b"HTTP/"[..n] {
            return Err(NotHttp(format!("it began {:?}", String::from_utf8_lossy(&self.head[..n]))));
        }
        if self.head.len() > MAX_HEAD {
            return Err(NotHttp(format!("its answer head is longer than {} KiB", MAX_HEAD / 1024)));
        }
        if !self.head.ends_with(b"\r\n\r\n") {
            return Ok(None);
        }
        String::from_utf8(std::mem::take(&mut self.head))
            .map(Some)
            .map_err(|_| NotHttp("its answer head is not text".into()))
    }
}

/// The status code and status line of a response head (`HTTP/1.1 200 Connection
/// established`).
pub fn status_of(head: &str) -> Result<(u16, &str), NotHttp> {
    let line = head.lines().next().unwrap_or_default().trim();
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| NotHttp(format!("its status line {line:?} has no status code")))?;
    let text = line.split_once(' ').map_or(line, |(_, rest)| rest);
    Ok((code, text))
}

// === connect ===

/// Why no TCP connection to the relay could be had. Each says, in one line, what was
/// dialed, what happened and what to do; none shows a password.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The relay (or the proxy) could not be reached over TCP.
    #[error("cannot connect to {target}: {error}")]
    Connect { target: String, error: std::io::Error },
    /// The TCP connect, or the proxy's answer, took longer than [`RELAY_CONNECT_TIMEOUT`].
    #[error("{0}")]
    Timeout(String),
    /// The proxy answered `CONNECT` with a status other than 2xx.
    #[error("the proxy {proxy} refused CONNECT {authority}: {status_line} ({hint})")]
    Refused { proxy: String, authority: String, status: u16, status_line: String, hint: String },
    /// The proxy's answer was not HTTP, or it closed the connection.
    #[error(
        "the proxy {proxy} gave no HTTP answer to CONNECT {authority}: {why}; is {source_var} the address of an HTTP proxy?"
    )]
    NotHttp { proxy: String, authority: String, why: String, source_var: &'static str },
}

impl EgressError {
    /// The proxy's status code, when it refused.
    pub fn proxy_status(&self) -> Option<u16> {
        match self {
            EgressError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Opens a TCP connection to the relay at `authority` (`host:port`), through `proxy`
/// unless it is `None` or `NO_PROXY` covers the host. Bounded by
/// [`RELAY_CONNECT_TIMEOUT`] (the connect, then the proxy's answer).
pub async fn connect_relay(authority: &str, proxy: Option<&Proxy>) -> Result<TcpStream, EgressError> {
    connect_relay_metered(authority, proxy, None).await.map(|(s, _)| s)
}

/// Like [`connect_relay`], registering the socket with `meter` before it connects (a
/// data connection's TLS byte counts). Through a proxy the registered socket is the one
/// to the proxy, which carries the tunnel (its counts include the short `CONNECT`
/// exchange).
pub async fn connect_relay_metered(
    authority: &str,
    proxy: Option<&Proxy>,
    meter: Option<&Arc<Meter>>,
) -> Result<(TcpStream, Option<Registration>), EgressError> {
    let (host, port) = split_host_port(authority).and_then(|(h, p)| Some((h, p?))).unwrap_or((authority, 443));
    let proxy = proxy.filter(|p| !p.bypasses(host, port));
    let Some(proxy) = proxy else {
        return tcp(authority, meter, || format!("the relay at {authority}")).await;
    };
    let proxy_addr = bracketed(&proxy.host, proxy.port);
    let (mut s, registration) = tcp(&proxy_addr, meter, || {
        format!("the proxy {proxy} (from {}) to reach the relay at {authority}", proxy.source)
    })
    .await?;
    tokio::time::timeout(RELAY_CONNECT_TIMEOUT, tunnel(&mut s, proxy, authority)).await.map_err(|_| {
        EgressError::Timeout(format!(
            "the proxy {proxy} did not answer CONNECT {authority} within {RELAY_CONNECT_TIMEOUT:?}"
        ))
    })??;
    Ok((s, registration))
}

/// A TCP connection to `addr`, bounded by [`RELAY_CONNECT_TIMEOUT`]; `what` names it.
async fn tcp(
    addr: &str,
    meter: Option<&Arc<Meter>>,
    what: impl Fn() -> String,
) -> Result<(TcpStream, Option<Registration>), EgressError> {
    tokio::time::timeout(RELAY_CONNECT_TIMEOUT, connect_metered(addr, meter))
        .await
        .map_err(|_| EgressError::Timeout(format!("connecting to {} timed out", what())))?
        .map_err(|error| EgressError::Connect { target: what(), error })
}

/// Sends `CONNECT authority` on `s` and reads the proxy's answer head, no further.
async fn tunnel(s: &mut TcpStream, proxy: &Proxy, authority: &str) -> Result<(), EgressError> {
    let not_http = |why: String| EgressError::NotHttp {
        proxy: proxy.to_string(),
        authority: authority.to_owned(),
        why,
        source_var: proxy.source,
    };
    let io = |e: std::io::Error| not_http(format!("the connection failed ({e})"));
    s.write_all(proxy.connect_request(authority).as_bytes()).await.map_err(io)?;
    let mut reader = HeadReader::default();
    let mut buf = [0u8; 4];
    let head = loop {
        let want = reader.want();
        let n = s.read(&mut buf[..want]).await.map_err(io)?;
        if n == 0 {
            return Err(not_http("it closed the connection without an answer".into()));
        }
        if let Some(head) = reader.feed(&buf[..n]).map_err(|e| not_http(e.0))? {
            break head;
        }
    };
    let (status, line) = status_of(&head).map_err(|e| not_http(e.0))?;
    if (200..300).contains(&status) {
        return Ok(());
    }
    Err(EgressError::Refused {
        proxy: proxy.to_string(),
        authority: authority.to_owned(),
        status,
        status_line: line.to_owned(),
        hint: proxy.hint(status),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn proxy_urls_parse_like_curl() {
        let p = Proxy::parse("HTTPS_PROXY", "http://proxy.corp:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.credentials.is_none()), ("proxy.corp", 3128, true));
        assert_eq!(p.to_string(), "http://proxy.corp:3128");
        let p = Proxy::parse("HTTPS_PROXY", " proxy.corp ").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", DEFAULT_PROXY_PORT));
        let p = Proxy::parse("HTTPS_PROXY", "HTTP://[fd00::1]:8080/").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.to_string().as_str()), ("fd00::1", 8080, "http://[fd00::1]:8080"));
        let p = Proxy::parse("SLUICE_PROXY", "http://al%40corp:p%3As%20w@10.0.0.1:3128").unwrap();
        let (user, pass) = p.credentials.as_ref().unwrap();
        assert_eq!((user.as_str(), pass.expose().as_str()), ("al@corp", "p:s w"));
        assert_eq!(p.describe(), "http://al@corp:***@10.0.0.1:3128");
        let p = Proxy::parse("SLUICE_PROXY", "http://user@proxy:3128").unwrap();
        assert_eq!(p.credentials.as_ref().unwrap().1.expose(), "");
    }

    #[test]
    fn bad_proxy_urls_name_the_variable_and_never_the_password() {
        for (url, want) in [
            ("https://u:hunter2@proxy:3128", "over TLS (https://) is not supported"),
            ("socks5://proxy:1080", "socks5:// is not supported"),
            ("http://proxy:99999", "port"),
            ("http://proxy:0", "port"),
            ("http://u:hunter2@proxy:x", "port"),
            ("http://:3128", "no host"),
            ("http://u:hunter2%zz@proxy:1", "broken %-escape"),
            ("http://:hunter2@proxy:1", "user name"),
            ("http://pro xy:1", "characters"),
        ] {
            let e = Proxy::parse("HTTPS_PROXY", url).unwrap_err();
            assert!(e.starts_with("HTTPS_PROXY=") && e.contains(want), "{url}: {e}");
            assert!(!e.contains("hunter2") && !e.contains('\n'), "{url}: {e}");
        }
        assert_eq!(redact("http://u:hunter2@proxy:1/x@y"), "http://u:***@proxy:1/x@y");
        assert_eq!(redact("proxy:1"), "proxy:1");
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let p = Proxy::parse("HTTPS_PROXY", "http://alice:hunter2@proxy:3128").unwrap();
        let shown = format!("{p:?} {p} {}", p.describe());
        assert!(!shown.contains("hunter2") && shown.contains("alice:***@proxy:3128"), "{shown}");
        // The request does carry it, base64-encoded, to the proxy only.
        let req = p.connect_request("relay.example.com:443");
        assert!(req.starts_with("CONNECT relay.example.com:443 HTTP/1.1\r\nHost: relay.example.com:443\r\n"));
        assert!(req.contains("Proxy-Authorization: Basic YWxpY2U6aHVudGVyMg==\r\n") && req.ends_with("\r\n\r\n"));
    }

    #[test]
    fn sluice_proxy_wins_and_none_turns_proxies_off() {
        let std = env(&[("HTTPS_PROXY", "http://upper:1"), ("https_proxy", "http://lower:2"), ("NO_PROXY", "a.b")]);
        let p = Proxy::select(None, &std).unwrap().unwrap();
        assert_eq!((p.to_string().as_str(), p.source()), ("http://lower:2", "https_proxy"));
        assert!(p.bypasses("x.a.b", 443));
        let p = Proxy::select(Some("http://explicit:3"), &std).unwrap().unwrap();
        assert_eq!((p.to_string().as_str(), p.source()), ("http://explicit:3", "SLUICE_PROXY"));
        assert!(p.bypasses("a.b", 443), "NO_PROXY applies to SLUICE_PROXY too");
        for off in ["none", "NONE", "", " "] {
            assert!(Proxy::select(Some(off), &std).unwrap().is_none(), "{off:?}");
        }
        let upper = env(&[("HTTPS_PROXY", "http://upper:1"), ("https_proxy", " "), ("ALL_PROXY", "http://all:9")]);
        assert_eq!(Proxy::select(None, &upper).unwrap().unwrap().to_string(), "http://upper:1");
        assert!(
            Proxy::select(None, &env(&[("ALL_PROXY", "http://all:9"), ("HTTP_PROXY", "http://h:1")]))
                .unwrap()
                .is_none()
        );
        let e = Proxy::select(None, &env(&[("HTTPS_PROXY", "https://p:1")])).unwrap_err();
        assert!(e.starts_with("HTTPS_PROXY="), "{e}");
        let e = Proxy::select(Some("ftp://p"), &env(&[])).unwrap_err();
        assert!(e.starts_with("SLUICE_PROXY="), "{e}");
    }

    #[test]
    fn no_proxy_matches_domains_ips_blocks_and_ports() {
        let n = NoProxy::parse(
            "NO_PROXY",
            "example.com, .corp.local *.internal,10.1.2.3, 192.168.0.0/16,[fd00::1],fd01::/16,relay.x:8443,Upper.CASE.",
        );
        let yes = [
            ("example.com", 443),
            ("EXAMPLE.com.", 443),
            ("relay.example.com", 443),
            ("corp.local", 1),
            ("a.b.corp.local", 1),
            ("internal", 1),
            ("x.internal", 1),
            ("10.1.2.3", 443),
            ("192.168.7.9", 443),
            ("[fd00::1]", 443),
            ("fd01:2::3", 443),
            ("relay.x", 8443),
            ("upper.case", 1),
        ];
        for (h, p) in yes {
            assert!(n.matches(h, p), "{h}:{p} should bypass");
        }
        let no = [
            ("notexample.com", 443),
            ("example.com.evil", 443),
            ("10.1.2.4", 443),
            ("192.169.0.1", 443),
            ("fd02::1", 443),
            ("relay.x", 443),
            ("other", 443),
        ];
        for (h, p) in no {
            assert!(!n.matches(h, p), "{h}:{p} should go through the proxy");
        }
        assert!(NoProxy::parse("no_proxy", "*").matches("anything", 1));
        assert!(NoProxy::parse("no_proxy", "a.b, *").matches("anything", 1));
        assert!(!NoProxy::parse("no_proxy", "10.0.0.0/99, /8, :443").matches("10.0.0.1", 443));
        assert!(NoProxy::parse("no_proxy", "").is_empty());
    }

    /// Feeds `answer` in reads of `chunk` bytes, never more than the reader wants;
    /// returns the head and how many bytes were left unread.
    fn read_in(answer: &[u8], chunk: usize) -> (Result<String, NotHttp>, usize) {
        let mut r = HeadReader::default();
        let mut at = 0;
        loop {
            let n = r.want().min(chunk).min(answer.len() - at);
            if n == 0 {
                return (Err(NotHttp("ran out".into())), answer.len() - at);
            }
            match r.feed(&answer[at..at + n]) {
                Ok(Some(head)) => return (Ok(head), answer.len() - at - n),
                Ok(None) => at += n,
                Err(e) => return (Err(e), answer.len() - at - n),
            }
        }
    }

    #[test]
    fn the_answer_head_is_read_in_any_split_and_never_past_its_end() {
        let head = "HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n";
        let after = b"\x16\x03\x03 the relay's TLS bytes \r\n\r\n";
        let answer = [head.as_bytes(), after].concat();
        for chunk in 1..=4 {
            let (got, left) = read_in(&answer, chunk);
            assert_eq!(got.unwrap(), head, "chunk {chunk}");
            assert_eq!(left, after.len(), "chunk {chunk}: nothing after the head is read");
        }
        assert_eq!(status_of(head).unwrap(), (200, "200 Connection established"));
        let refused = "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n";
        assert_eq!(status_of(refused).unwrap(), (407, "407 Proxy Authentication Required"));
        // "\r\n\r" then "\r\n\r\n": a partial match that fails must not over- or under-read.
        let tricky = "HTTP/1.1 200 OK\r\nX: \r\r\n\r\n";
        let (got, left) = read_in(format!("{tricky}rest").as_bytes(), 4);
        assert_eq!((got.unwrap().as_str(), left), (tricky, 4));
    }

    #[test]
    fn a_non_http_answer_is_refused_early() {
        let (got, _) = read_in(b"\x16\x03\x01\x00\x05hello TLS", 4);
        assert!(got.unwrap_err().0.contains("it began"));
        let (got, _) = read_in(b"SSH-2.0-OpenSSH\r\n\r\n", 4);
        assert!(got.is_err());
        let long = format!("HTTP/1.1 200 OK\r\n{}", "X: y\r\n".repeat(MAX_HEAD / 6 + 1));
        let (got, _) = read_in(long.as_bytes(), 4);
        assert!(got.unwrap_err().0.contains("longer than 16 KiB"));
        assert!(status_of("HTTP/1.1 OK\r\n\r\n").is_err());
    }

    /// A proxy that answers `answer` to whatever it is sent, then `after`.
    async fn fake_proxy(answer: &'static [u8]) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).await.unwrap();
                req.push(b[0]);
            }
            s.write_all(answer).await.unwrap();
            req
        });
        (addr, task)
    }

    #[tokio::test]
    async fn connect_hands_on_the_bytes_after_the_head() {
        let (addr, task) = fake_proxy(b"HTTP/1.1 200 OK\r\n\r\nfirst relay bytes").await;
        let p = Proxy::parse("HTTPS_PROXY", &format!("http://u:pw@{addr}")).unwrap();
        let mut s = connect_relay("relay.example.com:443", Some(&p)).await.unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "first relay bytes");
        let req = String::from_utf8(task.await.unwrap()).unwrap();
        assert!(req.starts_with("CONNECT relay.example.com:443 HTTP/1.1\r\n") && req.contains("Basic dTpwdw=="));
    }

    #[tokio::test]
    async fn a_refusal_is_one_line_naming_the_proxy_and_its_status() {
        let (addr, _task) = fake_proxy(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
        let p = Proxy::parse("HTTPS_PROXY", &format!("http://{addr}")).unwrap();
        let e = connect_relay("relay.example.com:443", Some(&p)).await.unwrap_err();
        assert_eq!(e.proxy_status(), Some(407));
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "the proxy http://{addr} refused CONNECT relay.example.com:443: 407 Proxy Authentication Required ("
            )) && msg.contains("set user:password in SLUICE_PROXY/HTTPS_PROXY")
                && !msg.contains('\n'),
            "{msg}"
        );
        let (addr, _task) = fake_proxy(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        let p = Proxy::parse("HTTPS_PROXY", &format!("http://u:hunter2@{addr}")).unwrap();
        let msg = connect_relay("relay.example.com:443", Some(&p)).await.unwrap_err().to_string();
        assert!(
            msg.contains("gave no HTTP answer") && msg.contains("HTTPS_PROXY") && !msg.contains("hunter2"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn no_proxy_hosts_and_no_proxy_dial_directly() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = l.local_addr().unwrap().to_string();
        // A proxy that does not exist: only a direct dial can succeed.
        let mut p = Proxy::parse("HTTPS_PROXY", "http://127.0.0.1:1").unwrap();
        assert!(
            connect_relay(&authority, Some(&p)).await.unwrap_err().to_string().contains("the proxy http://127.0.0.1:1")
        );
        p.no_proxy = NoProxy::parse("NO_PROXY", "127.0.0.0/8");
        connect_relay(&authority, Some(&p)).await.unwrap();
        connect_relay(&authority, None).await.unwrap();
    }
}
