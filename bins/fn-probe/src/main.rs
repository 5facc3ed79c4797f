//! fn-probe: the health probe baked into the container images, where there is no shell or
//! curl for a `HEALTHCHECK`.
//!
//! ```text
//! fn-probe grpc <host:port> [--service NAME]   # grpc.health.v1 Check: SERVING → exit 0
//! fn-probe http <host:port> <path>             # GET <path>: status 200 → exit 0
//! fn-probe grpc 127.0.0.1:9190 --port-env FN_GRPC_PORT   # the port of the daemon's own
//!                                                         # variable, when it is set
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
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
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
    /// An environment variable (the daemon's own, e.g. FN_GRPC_PORT) whose value, when set,
    /// replaces the address's port: an image's health check then follows a port changed
    /// in the container's environment.
    #[arg(long, global = true, value_name = "VAR")]
    port_env: Option<String>,
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
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: expected a duration such as 500ms or 3s ({e})"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let given = match &cli.probe {
        Probe::Grpc { address, .. } | Probe::Http { address, .. } => address,
    };
    let address = match &cli.port_env {
        Some(var) => match with_port_from(given, var, std::env::var(var).ok()) {
            Ok(address) => address,
            Err(reason) => {
                eprintln!("fn-probe: {reason}");
                return ExitCode::from(2);
            }
        },
        None => given.clone(),
    };
    let address = address.as_str();
    let (what, probe) = match &cli.probe {
        Probe::Grpc { service, tls, .. } => (
            format!("grpc {address}"),
            grpc(address, service, tls).boxed(),
        ),
        Probe::Http { path, .. } => (format!("http {address}{path}"), http(address, path).boxed()),
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

/// `address` (`host:port`) with its port replaced by `value`, the value of `var`, when
/// that is set and not empty.
fn with_port_from(address: &str, var: &str, value: Option<String>) -> Result<String, String> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(address.to_owned());
    };
    let port: u16 = value
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{var}: {value:?} is not a port (1-65535)"))?;
    let (host, _) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address:?}: expected host:port"))?;
    Ok(format!("{host}:{port}"))
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
        .map_err(|e| format!("cannot connect: {}", fn_lifecycle::logging::error_chain(&e)))?;
    let reply = HealthClient::new(fn_tls::WithoutStatusDetails(channel))
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
    let request = Request::get(path)
        .header(header::HOST, address)
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot make a request for {path:?} to {address:?}: {e}"))?;
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("cannot connect: {}", fn_lifecycle::logging::error_chain(&e)))?;
    // Its errors reach `send_request` too; the task ends with the runtime at the latest.
    tokio::spawn(connection);
    // The status is all a probe needs: the body is never read.
    let response = sender.send_request(request).await.map_err(|e| {
        if e.is_parse() {
            format!(
                "not an HTTP answer: {}",
                fn_lifecycle::logging::error_chain(&e)
            )
        } else {
            format!("no answer: {}", fn_lifecycle::logging::error_chain(&e))
        }
    })?;
    match response.status() {
        StatusCode::OK => Ok(()),
        code => Err(format!("status {}", code.as_u16())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        let err = parse_duration("3").expect_err("a bare number has no unit");
        assert!(
            err.starts_with("\"3\": expected a duration such as 500ms or 3s"),
            "{err}"
        );
        let cli = Cli::try_parse_from(["fn-probe", "--timeout", "500ms", "http", "a:1", "/"])
            .expect("valid arguments");
        assert_eq!(cli.timeout, Duration::from_millis(500));
        let err = Cli::try_parse_from(["fn-probe", "--timeout", "soon", "http", "a:1", "/"])
            .expect_err("a bad timeout is refused");
        assert!(err.to_string().contains("expected a duration"), "{err}");
    }

    #[test]
    fn the_port_comes_from_the_named_variable_when_it_is_set() {
        let from = |address: &str, value: Option<&str>| {
            with_port_from(address, "FN_GRPC_PORT", value.map(str::to_owned))
        };
        assert_eq!(from("127.0.0.1:9190", None), Ok("127.0.0.1:9190".into()));
        assert_eq!(
            from("127.0.0.1:9190", Some("")),
            Ok("127.0.0.1:9190".into())
        );
        assert_eq!(
            from("127.0.0.1:9190", Some("9300")),
            Ok("127.0.0.1:9300".into())
        );
        assert_eq!(from("[::1]:9190", Some("9300")), Ok("[::1]:9300".into()));
        assert_eq!(
            from("127.0.0.1:9190", Some("http")),
            Err("FN_GRPC_PORT: \"http\" is not a port (1-65535)".into())
        );
        assert!(from("127.0.0.1:9190", Some("0")).is_err());
        assert!(from("127.0.0.1:9190", Some("70000")).is_err());
        assert_eq!(
            from("localhost", Some("9300")),
            Err("\"localhost\": expected host:port".into())
        );
        let cli = Cli::try_parse_from([
            "fn-probe",
            "grpc",
            "127.0.0.1:9190",
            "--port-env",
            "FN_GRPC_PORT",
        ])
        .expect("valid arguments");
        assert_eq!(cli.port_env.as_deref(), Some("FN_GRPC_PORT"));
    }

    /// A server on 127.0.0.1 giving one raw answer to each of `answers` connections.
    async fn serve(answers: &'static [&'static str]) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            for answer in answers {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.expect("read");
                    assert!(n > 0, "request cut short");
                    request.extend_from_slice(&buf[..n]);
                }
                let request = String::from_utf8_lossy(&request);
                assert!(request.starts_with("GET /health HTTP/1.1\r\n"), "{request}");
                assert!(
                    request
                        .to_ascii_lowercase()
                        .contains(&format!("host: {}\r\n", s.local_addr().expect("addr"))),
                    "{request}"
                );
                s.write_all(answer.as_bytes()).await.expect("write");
            }
        });
        (address, server)
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        let (address, server) = serve(&[
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 503 Nope\r\ncontent-length: 0\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n",
        ])
        .await;
        assert_eq!(http(&address, "/health").await, Ok(()));
        assert_eq!(
            http(&address, "/health").await,
            Err("status 503".to_owned())
        );
        let err = http(&address, "/health").await.expect_err("not HTTP");
        assert!(err.starts_with("not an HTTP answer: "), "{err}");
        server.await.expect("server");
        assert_eq!(
            http(&address, "health").await,
            Err("path \"health\" must start with /".to_owned())
        );
        // The listener is gone: nothing answers at the address any more.
        let err = http(&address, "/health").await.expect_err("refused");
        assert!(err.starts_with("cannot connect: "), "{err}");
    }
}
