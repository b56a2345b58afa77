//! The relay URL agents dial: `https://host:port` (port 443 when omitted).

use std::fmt;

/// A parsed relay URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    pub host: String,
    pub port: u16,
}

impl RelayUrl {
    /// Parses `https://host[:port][/]`; IPv6 hosts in brackets.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s.trim().strip_prefix("https://").ok_or_else(|| {
            format!("relay URL {s:?} must start with https:// (for example https://relay.example.com:443)")
        })?;
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return Err(format!("relay URL {s:?} must be https://host[:port] with no path"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("relay URL {s:?}: unclosed '['"))?;
            let port = match after {
                "" => None,
                after => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("relay URL {s:?}: {after:?} after the IPv6 address; write https://[address]:port")
                })?),
            };
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("relay URL {s:?}: {h:?} in brackets is not an IPv6 address"));
            }
            (h.to_owned(), port)
        } else {
            match rest.split_once(':') {
                Some((h, p)) if p.contains(':') => {
                    return Err(format!(
                        "relay URL {s:?}: host {h:?} is followed by more than one ':'; an IPv6 address goes in \
                         brackets (https://[::1]:443)"
                    ));
                }
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (rest.to_owned(), None),
            }
        };
        let port = match port {
            None => 443,
            Some(p) => p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("relay URL {s:?}: {p:?} is not a port (1-65535)"))?,
        };
        if host.is_empty() {
            return Err(format!("relay URL {s:?} has no host"));
        }
        if let Some(c) = host.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("relay URL {s:?}: the host contains {c:?}"));
        }
        Ok(RelayUrl { host, port })
    }

    /// `host:port` for connecting (brackets around IPv6).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!(
            RelayUrl::parse("https://r.example:8443/").unwrap(),
            RelayUrl { host: "r.example".into(), port: 8443 }
        );
        assert_eq!(RelayUrl::parse("https://r").unwrap().port, 443);
        let v6 = RelayUrl::parse("https://[::1]:9").unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "https://[::1]:9");
        for bad in ["http://r:1", "https://", "https://r:0", "https://r:x", "https://r/p"] {
            assert!(RelayUrl::parse(bad).is_err(), "{bad}");
        }
    }

    /// Found by the `identity` fuzz target: parts of what the operator wrote were
    /// silently dropped or folded into the host, so the agent dialed something else.
    #[test]
    fn nothing_written_is_silently_dropped() {
        for bad in [
            // An unbracketed host with a colon: was host "rel.com:8443ay.example.com".
            "https://rel.com:8443ay.example.com:8443/",
            "https://relay.example.com:8443:9000",
            // Text after the IPv6 address: was port 443, the ":8443" ignored.
            "https://[::1]x:8443",
            "https://[::1]]",
            // A sign before the port: was port 1.
            "https://r:+1",
            "https://r:",
            // Brackets around something that is not an IPv6 address: was host " g1\0…",
            // printed without its brackets.
            "https://[ g1\0\0]:9",
            "https://[relay.example.com]:9",
            // Spaces or control characters in the host.
            "https://relay example.com",
            "https://relay\u{1b}[31m.example.com",
        ] {
            let got = RelayUrl::parse(bad);
            assert!(got.is_err(), "{bad:?} was read as {got:?}");
        }
        assert_eq!(RelayUrl::parse("https://[::1]").unwrap(), RelayUrl { host: "::1".into(), port: 443 });
        assert_eq!(RelayUrl::parse(" https://r:08443 ").unwrap(), RelayUrl { host: "r".into(), port: 8443 });
    }
}
