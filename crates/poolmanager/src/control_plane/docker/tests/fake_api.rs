//! A fake Engine API on a unix socket, for the swarm engine: the requests bollard makes on
//! a connection, read one after another, each answered by the test's function of its
//! method and path (query included), and kept.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// A request the fake Engine API answered: method, path (query included) and body.
pub(super) type Request = (String, String, String);

/// An answer: the status line's code and reason, and the JSON body.
pub(super) type Answer = (&'static str, String);

/// Serves requests on `listener`, answering each with `answer(method, path)` and keeping it
/// in `seen`. Ends when the listener is dropped with the test.
pub(super) async fn serve<F>(listener: UnixListener, answer: F, seen: Arc<Mutex<Vec<Request>>>)
where
    F: Fn(&str, &str) -> Answer + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    while let Ok((stream, _)) = listener.accept().await {
        let (seen, answer) = (Arc::clone(&seen), Arc::clone(&answer));
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            // One request after another on the connection, until the client closes it.
            for _ in 0..1000 {
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_owned();
                let path = parts.next().unwrap_or_default().to_owned();
                let mut length = 0;
                for _ in 0..100 {
                    let mut header = String::new();
                    if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let header = header.trim_end();
                    if header.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                if read.read_exact(&mut body).await.is_err() {
                    return;
                }
                let (status, body_out) = answer(&method, &path);
                seen.lock().expect("seen lock").push((
                    method,
                    path,
                    String::from_utf8_lossy(&body).into_owned(),
                ));
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body_out}",
                    body_out.len()
                );
                if write.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A bollard client of the fake API at `socket`.
pub(super) fn client(socket: &std::path::Path) -> bollard::Docker {
    bollard::Docker::connect_with_unix(
        &socket.display().to_string(),
        10,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("client")
}

/// A query's value as it was before URL encoding (`%XX` and `+`).
pub(super) fn decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
