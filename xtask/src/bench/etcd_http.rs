//! A small client for etcd's JSON gateway (`/v3/...` on the client port):
//! plain HTTP/1.1 on one kept-alive connection, so writing thousands of
//! leases needs neither a gRPC stack (and protoc) in xtask nor thousands
//! of etcdctl processes, and a put is timed without process start-up.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use netd_tests::NsRef;
use serde_json::{Value, json};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub struct EtcdHttp {
    conn: BufReader<TcpStream>,
    host: String,
}

impl EtcdHttp {
    /// Connects from inside `ns` (the socket stays in that namespace
    /// whichever thread uses it later).
    pub fn connect(ns: &NsRef, addr: SocketAddr) -> Result<Self> {
        let stream = ns
            .run_in_thread(move || TcpStream::connect_timeout(&addr, IO_TIMEOUT))
            .with_context(|| format!("connect to etcd at {addr}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(EtcdHttp {
            conn: BufReader::new(stream),
            host: addr.to_string(),
        })
    }

    /// POSTs `body` to `path`; returns the JSON answer.
    pub fn post(&mut self, path: &str, body: &Value) -> Result<Value> {
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.conn.get_mut().write_all(request.as_bytes())?;
        let (status, answer) = self
            .read_response()
            .with_context(|| format!("POST {path}"))?;
        let v: Value = serde_json::from_slice(&answer).with_context(|| {
            format!(
                "POST {path}: answer is not JSON: {}",
                String::from_utf8_lossy(&answer)
            )
        })?;
        if status != 200 {
            bail!("POST {path}: HTTP {status}: {v}");
        }
        Ok(v)
    }

    fn read_response(&mut self) -> Result<(u16, Vec<u8>)> {
        let mut line = String::new();
        self.conn.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            self.conn.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().ok(),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
        let body = match (length, chunked) {
            (_, true) => self.read_chunked()?,
            (Some(n), false) => {
                let mut b = vec![0; n];
                self.conn.read_exact(&mut b)?;
                b
            }
            (None, false) => bail!("response without length"),
        };
        Ok((status, body))
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            self.conn.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            let mut chunk = vec![0; size + 2];
            self.conn.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..size]);
            if size == 0 {
                return Ok(body);
            }
        }
    }

    /// Grants a lease; returns its id.
    pub fn lease_grant(&mut self, ttl_secs: u64) -> Result<i64> {
        let v = self.post("/v3/lease/grant", &json!({ "TTL": ttl_secs }))?;
        int64(&v["ID"]).context("lease grant answered no ID")
    }

    /// Revokes a lease, deleting its keys.
    pub fn lease_revoke(&mut self, id: i64) -> Result<()> {
        self.post("/v3/lease/revoke", &json!({ "ID": id.to_string() }))?;
        Ok(())
    }

    /// Puts every pair in one transaction, all bound to `lease`.
    pub fn put_all(&mut self, pairs: &[(String, String)], lease: i64) -> Result<()> {
        if pairs.len() > MAX_TXN_OPS {
            bail!(
                "{} puts exceed etcd's {MAX_TXN_OPS} operations per transaction",
                pairs.len()
            );
        }
        let ops: Vec<Value> = pairs
            .iter()
            .map(|(k, v)| json!({ "requestPut": put_body(k, v, lease) }))
            .collect();
        let v = self.post("/v3/kv/txn", &json!({ "success": ops }))?;
        if v["succeeded"].as_bool() != Some(true) {
            bail!("transaction failed: {v}");
        }
        Ok(())
    }

    pub fn put(&mut self, key: &str, value: &str, lease: i64) -> Result<()> {
        self.post("/v3/kv/put", &put_body(key, value, lease))?;
        Ok(())
    }

    /// Number of keys under `prefix`.
    pub fn count_prefix(&mut self, prefix: &str) -> Result<u64> {
        let end = prefix_end(prefix);
        let v = self.post(
            "/v3/kv/range",
            &json!({ "key": B64.encode(prefix), "range_end": B64.encode(end), "count_only": true }),
        )?;
        Ok(int64(&v["count"]).unwrap_or(0) as u64)
    }
}

fn put_body(key: &str, value: &str, lease: i64) -> Value {
    json!({ "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() })
}

/// The gateway writes int64 as a JSON string.
fn int64(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

/// The smallest key after every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/a/b/"), b"/a/b0");
    }

    #[test]
    fn reads_gateway_int64() {
        assert_eq!(int64(&json!("7587869")), Some(7587869));
        assert_eq!(int64(&json!(12)), Some(12));
        assert_eq!(int64(&json!(null)), None);
    }
}
