//! fn-probe: the health probe baked into the container images, where there is no shell or
//! curl for a `HEALTHCHECK`.
//!
//! ```text
//! fn-probe grpc <host:port> [--service NAME]   # grpc.health.v1 Check: SERVING → exit 0
//! fn-probe http <host:port> <path>             # GET <path>: status 200 → exit 0
//! ```
//! Anything else exits 1 with a one-line reason on stderr; bad arguments exit 2. The gRPC
//! probe speaks mutual TLS with the daemons' own `FN_NODE_CERT*` / `FN_TLS_SERVER_NAME`
//! variables (or plaintext with `FN_INSECURE=true`), so inside a daemon's container it
//! needs no arguments beyond the address. Every probe is bounded by `--timeout`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fn_tls::TlsArgs;
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Health probe for the dataplane's daemons (container health checks).
#[derive(Debug, Parser)]
#[command(name = "fn-probe", version, about)]
struct Cli {
    /// Bound for the whole probe (connect, handshake, answer).
    #[arg(long, global = true, default_value = "3s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    probe: Probe,
}

#[derive(Debug, Subcommand)]
enum Probe {
    /// gRPC health check (grpc.health.v1.Health/Check); healthy when SERVING.
    Grpc {
        /// host:port of the gRPC server.
        address: String,
        /// Service name to ask about ("" is the whole server).
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// HTTP/1.1 GET; healthy when the status is 200.
    Http {
        /// host:port of the HTTP server.
        address: String,
        /// Path to request, e.g. /health.
        path: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime_like(s).ok_or_else(|| format!("{s:?}: expected a duration such as 500ms or 3s"))
}

/// `500ms` or `3s` (all a probe needs; keeps this binary free of a duration parser).
fn humantime_like(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.trim().parse().ok().map(Duration::from_millis);
    }
    s.strip_suffix('s')?
        .trim()
        .parse()
        .ok()
        .map(Duration::from_secs)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (what, probe) = match &cli.probe {
        Probe::Grpc {
            address,
            service,
            tls,
        } => (
            format!("grpc {address}"),
            grpc(address, service, tls).boxed(),
        ),
        Probe::Http { address, path } => {
            (format!("http {address}{path}"), http(address, path).boxed())
        }
    };
    let outcome = tokio::time::timeout(cli.timeout, probe)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", cli.timeout)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("unhealthy: {what}: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// Healthy, or why not.
type Outcome = Result<(), String>;

async fn grpc(address: &str, service: &str, tls: &TlsArgs) -> Outcome {
    let mode = tls.load().map_err(|e| e.to_string())?;
    fn_tls::install_crypto_provider();
    let endpoint = fn_tls::grpc_endpoint(&mode, address)
        .map_err(|e| format!("bad address or TLS settings: {e}"))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {}", source_chain(&e)))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| format!("health check failed: {} {}", s.code(), s.message()))?;
    match reply.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("status {}", other.as_str_name())),
    }
}

async fn http(address: &str, path: &str) -> Outcome {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with /"));
    }
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    // The status line is all a probe needs.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    match status_code(line) {
        Some(200) => Ok(()),
        Some(code) => Err(format!("status {code}")),
        None => Err(format!("not an HTTP answer: {line:?}")),
    }
}

/// The status code of an HTTP/1.x status line.
fn status_code(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

/// An error with its sources, which is where tonic puts the useful part ("dns error", ...).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        assert_eq!(status_code("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(status_code("HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_code("SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(""), None);
    }

    #[test]
    fn parses_durations() {
        assert_eq!(humantime_like("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(humantime_like("3s"), Some(Duration::from_secs(3)));
        assert_eq!(humantime_like("3"), None);
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            for answer in ["HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 503 Nope\r\n\r\n"] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 1024];
                let _request = s.read(&mut buf).await.expect("read");
                s.write_all(answer.as_bytes()).await.expect("write");
            }
        });
        assert_eq!(http(&address, "/health").await, Ok(()));
        assert_eq!(
            http(&address, "/health").await,
            Err("status 503".to_owned())
        );
        server.await.expect("server");
        assert!(http(&address, "health").await.is_err());
    }
}
