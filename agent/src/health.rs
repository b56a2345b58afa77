//! `sluice-agent health [ADDR]`: asks a running agent whether it is ready, for container
//! health checks (the distroless image has no curl or shell). It sends `GET /readyz` to
//! the agent's metrics listener — ADDR, else `SLUICE_METRICS_LISTEN` (the image sets
//! `127.0.0.1:9464`) — and exits 0 when the answer is 200 (a control session with the
//! relay is up), 1 otherwise with the agent's reason on one line, 2 when there is no
//! address to ask.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// How long the check waits for the agent to answer (Docker's default health-check
/// timeout is 30 s; the image asks for 5 s).
const TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the check; `addr` is the optional command-line address.
pub fn main(addr: Option<String>) -> ExitCode {
    let addr = addr.or_else(|| std::env::var("SLUICE_METRICS_LISTEN").ok()).filter(|a| !a.trim().is_empty());
    let Some(addr) = addr else {
        eprintln!(
            "sluice-agent health: no address to ask: the agent answers /readyz only with SLUICE_METRICS_LISTEN set \
             (e.g. 127.0.0.1:9464); set it for the agent and for this check, or pass the address: \
             sluice-agent health 127.0.0.1:9464"
        );
        return ExitCode::from(2);
    };
    match check(&addr) {
        Ok(body) => {
            println!("ready: {body}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("sluice-agent health: not ready: {why}");
            ExitCode::from(1)
        }
    }
}

/// `GET /readyz` at `addr`: the body when the agent answers 200, else why not.
pub fn check(addr: &str) -> Result<String, String> {
    let target: SocketAddr = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("{addr:?} is not an address: use host:port, e.g. 127.0.0.1:9464"))?;
    let mut tcp = TcpStream::connect_timeout(&target, TIMEOUT).map_err(|e| {
        format!("cannot connect to the agent's metrics listener at {addr} ({e}): is the agent running with SLUICE_METRICS_LISTEN={addr}?")
    })?;
    tcp.set_read_timeout(Some(TIMEOUT))
        .and_then(|()| tcp.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    tcp.write_all(format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("sending the request to {addr}: {e}"))?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).map_err(|e| format!("reading the answer from {addr}: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let status = response.split_whitespace().nth(1).unwrap_or("");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("").to_owned();
    match status {
        "200" => Ok(body),
        "" => Err(format!("{addr} gave no HTTP answer")),
        s => Err(format!("/readyz answered {s}: {body}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot HTTP server answering `response` to the first request.
    fn answer_once(response: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(response.as_bytes()).unwrap();
        });
        addr
    }

    #[test]
    fn ready_when_readyz_answers_200() {
        let addr = answer_once("HTTP/1.1 200 OK\r\ncontent-length: 18\r\n\r\n{\"status\":\"ready\"}");
        assert_eq!(check(&addr).unwrap(), r#"{"status":"ready"}"#);
    }

    #[test]
    fn not_ready_says_the_agents_reason() {
        let addr = answer_once("HTTP/1.1 503 Service Unavailable\r\n\r\n{\"reason\":\"connection refused\"}");
        let err = check(&addr).unwrap_err();
        assert!(err.contains("503") && err.contains("connection refused"), "{err}");
    }

    #[test]
    fn no_listener_names_the_setting() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = check(&format!("127.0.0.1:{port}")).unwrap_err();
        assert!(err.contains("SLUICE_METRICS_LISTEN"), "{err}");
        assert!(check("nowhere").unwrap_err().contains("not an address"));
    }
}
