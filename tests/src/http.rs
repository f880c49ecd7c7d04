//! A plain HTTP/1.0 GET from inside a namespace: enough for `/metrics`,
//! `/healthz` and Prometheus' query API, with no client library.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::NsRef;

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` from `addr`, connecting from inside `ns`.
pub fn get(ns: &NsRef, addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    ns.run_in_thread(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        parse(&String::from_utf8_lossy(&raw))
    })
}

fn parse(raw: &str) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_status_and_body() {
        let r = parse("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 3\r\n\r\nno\n").unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "no\n");
        assert!(parse("garbage").is_err());
    }
}
