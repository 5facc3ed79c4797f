//! Load for the reliability suites: echo calls with random payloads whose answers are
//! checked by SHA-256, over keep-alive HTTP/1.1 connections, each outcome classified.
//!
//! Payloads come from a fixed set of base payloads (sizes drawn once from a distribution,
//! the edge sizes always included) whose hashes are prepared up front; each call's body is
//! its base with the last 8 bytes replaced by the call's number, so every body is unique (a
//! response that belongs to another call is caught) while the sender hashes only 8 bytes per
//! call. Every response body is hashed in full as it streams in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

/// A small deterministic generator (SplitMix64): reproducible from a printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Log-uniform in `lo..=hi` (`lo >= 1`): as many sizes per doubling.
    pub fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let (lo_f, hi_f) = ((lo.max(1) as f64).ln(), (hi.max(1) as f64).ln());
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((lo_f + unit * (hi_f - lo_f)).exp().round() as u64).clamp(lo, hi)
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// One base payload and the hash state of all but its last 8 bytes.
#[derive(Debug, Clone)]
struct Base {
    data: Bytes,
    prefix: Sha256,
}

/// The payloads of a run.
#[derive(Debug, Clone)]
pub struct Payloads {
    bases: Vec<Base>,
    /// How many of the bases are the edge sizes (the first ones).
    edges: usize,
}

/// Bytes of a call's number that replace the end of its payload.
const TAG: usize = 8;

impl Payloads {
    /// `count` base payloads: the `edges` sizes, then sizes drawn by `size`.
    pub fn new(
        rng: &mut Rng,
        count: usize,
        edges: &[usize],
        size: impl Fn(&mut Rng) -> usize,
    ) -> Self {
        let mut sizes: Vec<usize> = edges.to_vec();
        while sizes.len() < count {
            sizes.push(size(rng));
        }
        let bases = sizes
            .into_iter()
            .map(|len| {
                let data = Bytes::from(rng.bytes(len));
                let mut prefix = Sha256::new();
                prefix.update(&data[..len.saturating_sub(TAG)]);
                Base { data, prefix }
            })
            .collect();
        Payloads {
            bases,
            edges: edges.len(),
        }
    }

    /// Sizes of the base payloads.
    pub fn sizes(&self) -> impl Iterator<Item = usize> + '_ {
        self.bases.iter().map(|b| b.data.len())
    }

    /// The body of call number `call` and its SHA-256: calls `0..edges.len()` use the edge
    /// sizes in order (so every run covers them), later ones a base chosen by `rng`.
    pub fn body(&self, rng: &mut Rng, call: u64) -> (Bytes, [u8; 32]) {
        let index = match usize::try_from(call) {
            Ok(i) if i < self.edges => i,
            _ => usize::try_from(rng.next_u64() % self.bases.len().max(1) as u64).unwrap_or(0),
        };
        let Some(base) = self.bases.get(index) else {
            return (Bytes::new(), Sha256::digest([]).into());
        };
        let len = base.data.len();
        let keep = len.saturating_sub(TAG);
        let tag = call.to_le_bytes();
        let tail = &tag[..len - keep];
        let mut body = BytesMut::with_capacity(len);
        body.extend_from_slice(&base.data[..keep]);
        body.extend_from_slice(tail);
        let mut hash = base.prefix.clone();
        hash.update(tail);
        (body.freeze(), hash.finalize().into())
    }
}

/// How one call ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `None` for success, else the error's kind (a ledger key).
    pub error: Option<String>,
    /// What exactly happened, for failure messages.
    pub detail: String,
    /// The response status, when a head arrived.
    pub status: Option<u16>,
    /// `Fn-Call-Id` of the response, when a head arrived.
    pub call_id: Option<String>,
    /// `X-Fn-Pid` of the response (the function instance), when present.
    pub pid: Option<u32>,
    pub started: Instant,
    pub latency: Duration,
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

/// A client on one keep-alive connection to the LB, reconnecting after any failure.
#[derive(Debug)]
pub struct Client {
    address: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(address: &str) -> Self {
        Client {
            address: address.to_owned(),
            sender: None,
        }
    }

    async fn connection(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if let Some(sender) = &mut self.sender
            && sender.ready().await.is_ok()
        {
            // Re-borrow: the connection is still usable.
            return self.sender.as_mut().context("connection vanished");
        }
        let stream = tokio::net::TcpStream::connect(&self.address)
            .await
            .with_context(|| format!("connecting to {}", self.address))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(self.sender.insert(sender))
    }

    /// `POST path` with `body`; succeeds only with 200 and a body whose SHA-256 is
    /// `expected`. The whole call is bounded by `bound` (past it: error `hung`).
    pub async fn echo(
        &mut self,
        path: &str,
        body: Bytes,
        expected: [u8; 32],
        bound: Duration,
    ) -> Outcome {
        let started = Instant::now();
        let mut outcome = Outcome {
            error: None,
            detail: String::new(),
            status: None,
            call_id: None,
            pid: None,
            started,
            latency: Duration::ZERO,
        };
        let sent = body.len();
        let result =
            tokio::time::timeout(bound, self.exchange(path, body, expected, &mut outcome)).await;
        outcome.latency = started.elapsed();
        let failure = match result {
            Err(_) => Some(("hung".to_owned(), format!("no answer within {bound:?}"))),
            Ok(Err((kind, detail))) => Some((kind, detail)),
            Ok(Ok(())) => None,
        };
        if let Some((kind, detail)) = failure {
            // A failed exchange leaves the connection in an unknown state.
            self.sender = None;
            outcome.error = Some(kind);
            outcome.detail = format!("{detail} (sent {sent} B)");
        }
        outcome
    }

    async fn exchange(
        &mut self,
        path: &str,
        body: Bytes,
        expected: [u8; 32],
        outcome: &mut Outcome,
    ) -> Result<(), (String, String)> {
        let address = self.address.clone();
        let sender = self
            .connection()
            .await
            .map_err(|e| ("connect".to_owned(), format!("{e:#}")))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("host", address)
            .header("content-type", "application/octet-stream")
            .body(Full::new(body))
            .map_err(|e| ("request".to_owned(), e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| (classify(&e), e.to_string()))?;
        let status = response.status();
        outcome.status = Some(status.as_u16());
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        outcome.call_id = header("fn-call-id");
        outcome.pid = header("x-fn-pid").and_then(|p| p.parse().ok());
        let mut body = response.into_body();
        let mut hash = Sha256::new();
        let mut received = 0usize;
        let mut text = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                (
                    "response body cut off".to_owned(),
                    format!("status {status}, after {received} B: {e}"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                received += data.len();
                if status != StatusCode::OK && text.len() < 512 {
                    text.extend_from_slice(&data[..data.len().min(512)]);
                }
                hash.update(&data);
            }
        }
        if status != StatusCode::OK {
            return Err((
                format!("http {}", status.as_u16()),
                String::from_utf8_lossy(&text).into_owned(),
            ));
        }
        let got: [u8; 32] = hash.finalize().into();
        if got != expected {
            return Err((
                "body hash mismatch".to_owned(),
                format!("received {received} B whose SHA-256 differs"),
            ));
        }
        Ok(())
    }
}

/// A ledger kind for a hyper client error.
fn classify(e: &hyper::Error) -> String {
    if e.is_incomplete_message() {
        "connection closed before the response".to_owned()
    } else if e.is_canceled() {
        "request canceled".to_owned()
    } else if e.is_parse() {
        "malformed response".to_owned()
    } else {
        "request failed".to_owned()
    }
}

/// Echo calls running in the background: `workers` loops of back-to-back calls on their own
/// keep-alive connections, until [`Load::stop`] (or `max_per_worker` calls each).
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

/// What a [`Load`] sends.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The LB's `host:port`.
    pub address: String,
    /// `POST` path of an echo function.
    pub path: String,
    pub workers: usize,
    pub payloads: Arc<Payloads>,
    pub seed: u64,
    /// Bound for one call (past it: `hung`).
    pub call_bound: Duration,
    /// A bound on the calls of each worker, so the load ends even if never stopped.
    pub max_per_worker: u64,
}

impl Load {
    pub fn start(spec: LoadSpec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let tasks = (0..spec.workers)
            .map(|w| {
                let stop = Arc::clone(&stop);
                let ok = Arc::clone(&ok);
                let spec = spec.clone();
                tokio::spawn(async move {
                    let mut rng = Rng::new(spec.seed ^ ((w as u64 + 1) << 40));
                    let mut client = Client::new(&spec.address);
                    let mut outcomes = Vec::new();
                    for i in 0..spec.max_per_worker {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        // Call numbers unique across workers, past the edge sizes.
                        let call = (w as u64 + 1) * 1_000_000_000 + i;
                        let (body, hash) = spec.payloads.body(&mut rng, call);
                        let outcome = client.echo(&spec.path, body, hash, spec.call_bound).await;
                        if outcome.is_ok() {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        outcomes.push(outcome);
                    }
                    outcomes
                })
            })
            .collect();
        Load { stop, ok, tasks }
    }

    /// Calls that succeeded so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `more` further calls have succeeded, at most `bound`.
    ///
    /// # Errors
    /// When they do not in time.
    pub async fn wait_ok(&self, more: u64, bound: Duration) -> anyhow::Result<()> {
        let target = self.ok() + more;
        let start = Instant::now();
        while self.ok() < target {
            anyhow::ensure!(
                start.elapsed() < bound,
                "only {} of {target} calls succeeded within {bound:?}",
                self.ok()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stops the workers (each finishes its call in flight) and returns every outcome.
    ///
    /// # Errors
    /// When a worker panicked or did not stop within its call bound.
    pub async fn stop(self) -> anyhow::Result<Vec<Outcome>> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(
                tokio::time::timeout(Duration::from_secs(120), task)
                    .await
                    .context("a load worker did not stop")??,
            );
        }
        Ok(all)
    }
}

/// Where the lb-agent placed one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub function: String,
    pub runner: String,
}

/// Where the lb-agent placed each call: call id → placement, from its JSON log
/// (`FN_LOG_FORMAT=json`, the `call placed` events).
pub fn placements(lb_log: &str) -> std::collections::HashMap<String, Placement> {
    let field = |line: &str, name: &str| {
        let key = format!("\"{name}\":\"");
        let start = line.find(&key)? + key.len();
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_owned())
    };
    lb_log
        .lines()
        .filter(|l| l.contains("\"call placed\""))
        .filter_map(|l| {
            let placement = Placement {
                function: field(l, "function")?,
                runner: field(l, "runner")?,
            };
            Some((field(l, "call_id")?, placement))
        })
        .collect()
}
