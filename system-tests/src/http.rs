//! A minimal HTTP/1.1 client for tests (one connection per request), with streaming bodies.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The pid of the function instance that answered (its `X-Fn-Pid`; the example
    /// functions send it).
    ///
    /// # Errors
    /// When the header is missing or not a number.
    pub fn fn_pid(&self) -> anyhow::Result<u32> {
        self.header("x-fn-pid")
            .context("no X-Fn-Pid")?
            .parse()
            .context("X-Fn-Pid is not a pid")
    }

    /// A header value as text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// How long [`request`] waits for a whole exchange: far longer than any call the tests make
/// takes, so that a server that accepts and never answers fails the test instead of hanging
/// it.
pub const REQUEST_BOUND: Duration = Duration::from_secs(60);

/// `GET path` at `address` (`host:port`).
///
/// # Errors
/// On connection or protocol failure, or no whole answer within [`REQUEST_BOUND`].
pub async fn get(address: &str, path: &str) -> anyhow::Result<Reply> {
    request(address, Method::GET, path, &[], Bytes::new()).await
}

/// [`get`] within `bound`.
///
/// # Errors
/// As [`get`], or no whole answer within `bound`.
pub async fn get_within(address: &str, path: &str, bound: Duration) -> anyhow::Result<Reply> {
    request_within(bound, address, Method::GET, path, &[], Bytes::new()).await
}

/// Sends one request with `body` and reads the whole response.
///
/// # Errors
/// On connection or protocol failure (including a response body cut off), or no whole
/// answer within [`REQUEST_BOUND`].
pub async fn request(
    address: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<Reply> {
    request_within(REQUEST_BOUND, address, method, path, headers, body).await
}

/// [`request`] within `bound`.
///
/// # Errors
/// As [`request`], or no whole answer within `bound`.
pub async fn request_within(
    bound: Duration,
    address: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<Reply> {
    let what = format!("{method} {path} at {address}");
    tokio::time::timeout(bound, exchange(address, method, path, headers, body))
        .await
        .with_context(|| format!("{what}: no whole answer within {bound:?}"))?
}

async fn exchange(
    address: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<Reply> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", address);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder.body(Full::new(body))?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that accepts and never answers fails the request at its bound.
    #[tokio::test]
    async fn a_silent_server_fails_the_request_at_its_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let held = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let started = std::time::Instant::now();
        let err = get_within(&address, "/health", Duration::from_millis(300))
            .await
            .expect_err("no answer");
        assert!(
            format!("{err:#}").contains("no whole answer within 300ms"),
            "{err:#}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        held.abort();
    }
}
