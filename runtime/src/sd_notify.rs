//! systemd's readiness protocol (`Type=notify`), the small part both binaries use: one
//! datagram per state change to the unix socket systemd names in `$NOTIFY_SOCKET` —
//! [`ready`] once the service does its job, [`status`] for the line `systemctl status`
//! shows, [`stopping`] when a drain begins.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or by a unit of another type) every
//! call does nothing. A name starting with `@` is a socket in the abstract namespace
//! (systemd uses those in containers). See sd_notify(3).

use std::io;
use std::os::unix::net::UnixDatagram;

/// The service is up: `READY=1`, with a status line.
pub fn ready(status: &str) -> io::Result<bool> {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)))
}

/// What the service is doing now, for `systemctl status`.
pub fn status(status: &str) -> io::Result<bool> {
    notify(&format!("STATUS={}", one_line(status)))
}

/// The service is stopping (a drain began): `STOPPING=1`, with a status line.
pub fn stopping(status: &str) -> io::Result<bool> {
    notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
}

/// Sends `state` to `$NOTIFY_SOCKET`; `Ok(false)` when it is not set.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var("NOTIFY_SOCKET") {
        Ok(socket) if !socket.is_empty() => send_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends one datagram holding `state` to `socket`: a path, or `@name` for the abstract
/// namespace.
pub fn send_to(socket: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let sent = match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?
        }
        None => sock.send_to(state.as_bytes(), socket)?,
    };
    if sent != state.len() {
        return Err(io::Error::other(format!("sent {sent} of {} bytes to {socket}", state.len())));
    }
    Ok(())
}

/// Newlines would start a new `KEY=value` assignment: a status is one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = tempfile_dir();
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1\nSTATUS=up").unwrap();
        assert_eq!(received(&sock), "READY=1\nSTATUS=up");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sluice-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "STOPPING=1").unwrap();
        assert_eq!(received(&sock), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_to_report() {
        assert!(send_to("/nonexistent/notify.sock", "READY=1").is_err());
    }

    #[test]
    fn a_status_stays_one_assignment() {
        assert_eq!(one_line("relay unreachable:\nrefused"), "relay unreachable: refused");
    }

    /// A fresh directory of this test process (the runtime crate has no tempfile dependency).
    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sluice-sd-notify-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
