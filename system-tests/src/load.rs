//! Load for the reliability suites: echo calls with random payloads whose answers are
//! checked by SHA-256, over keep-alive HTTP/1.1 connections, each outcome classified.
//!
//! Payloads come from a fixed set of base payloads (sizes drawn once from a distribution,
//! the edge sizes always included) whose hashes are prepared up front; each call's body is
//! its base with the last 8 bytes replaced by the call's number, so every body is unique (a
//! response that belongs to another call is caught) while the sender hashes only 8 bytes per
//! call. Every response body is hashed in full as it streams in.
//!
//! The end of the file holds the pure parts of `fn-load --soak`: duration parsing, `/proc`
//! status fields, counting the lb-agent log lines that show a runner connection torn down,
//! and the per-interval tallies.

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
    /// The response's `Server-Timing` has a `start` entry: the call started an instance.
    pub cold_start: bool,
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
            cold_start: false,
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
        outcome.cold_start = header("server-timing").is_some_and(|timing| {
            timing
                .split(',')
                .any(|metric| metric.trim_start().starts_with("start;"))
        });
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
/// (`FN_LOG_FORMAT=json`, the `call placed` events, logged at debug level by
/// `fn_lb::invoke`).
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

// ---- Soak: the pure parts of `fn-load --soak` (parsing, counting, arithmetic) ----------

/// A duration such as `90s`, `10m`, `1h30m` or `500ms`: the daemons' own parser (humantime).
pub use fn_lifecycle::config::parse_duration;

/// A `kB` field of a `/proc/<pid>/status` text (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// KiB as MiB with one decimal (`14848` → `14.5`).
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// `line` without ANSI colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: `[`, parameters, then a final letter.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a line of the lb-agent's log shows an LB → runner connection torn down or a
/// runner marked unreachable: `runner unreachable`, h2's `locally-reset streams reached
/// limit` (logged before it sends GOAWAY), `GOAWAY` / `go away`, `connection error`; case
/// and colour sequences do not matter.
pub fn is_teardown_line(line: &str) -> bool {
    let line = strip_ansi(line).to_ascii_lowercase();
    [
        "runner unreachable",
        "reached limit",
        "goaway",
        "go away",
        "connection error",
    ]
    .iter()
    .any(|needle| line.contains(needle))
}

/// The lines of `log` that [`is_teardown_line`] matches.
pub fn teardown_lines(log: &str) -> impl Iterator<Item = &str> {
    log.lines().filter(|l| is_teardown_line(l))
}

/// How many lines of `log` [`is_teardown_line`] matches.
pub fn count_teardowns(log: &str) -> usize {
    teardown_lines(log).count()
}

/// Resident set and open file descriptors of one daemon at one moment (`None`: could not
/// be read, e.g. the process is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcSample {
    pub rss_kib: Option<u64>,
    pub fds: Option<usize>,
}

impl ProcSample {
    /// `VmRSS` from `/proc/<pid>/status` and the entries of `/proc/<pid>/fd`.
    pub fn read(pid: Option<u32>) -> ProcSample {
        let Some(pid) = pid else {
            return ProcSample::default();
        };
        let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| status_kib(&s, "VmRSS"));
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()
            .map(Iterator::count);
        ProcSample { rss_kib, fds }
    }

    /// `14.5 MiB 23 fds` (a `?` for what could not be read).
    pub fn show(&self) -> String {
        format!(
            "{} MiB {} fds",
            self.rss_kib.map_or_else(|| "?".to_owned(), mib),
            self.fds.map_or_else(|| "?".to_owned(), |n| n.to_string())
        )
    }
}

/// The calls of one soak interval (or of the whole soak, merged): counts, errors by kind and,
/// for an interval, latencies.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub calls: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Payload bytes of the successful calls, one way.
    pub payload_bytes: u64,
    /// Latencies of the calls (kept for one interval only: [`Tally::merge`] drops them).
    pub latencies: Vec<Duration>,
}

impl Tally {
    /// One call that ended: `error` is its kind, `None` for success.
    pub fn record(&mut self, error: Option<&str>, payload: usize, latency: Duration) {
        self.calls += 1;
        match error {
            None => self.payload_bytes += payload as u64,
            Some(kind) => *self.errors.entry(kind.to_owned()).or_default() += 1,
        }
        self.latencies.push(latency);
    }

    /// Adds `other`'s counts (not its latencies: a soak's total stays small).
    pub fn merge(&mut self, other: &Tally) {
        self.calls += other.calls;
        self.payload_bytes += other.payload_bytes;
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += n;
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// `-` or `http 502: 3, hung: 1`.
    pub fn errors_by_kind(&self) -> String {
        if self.errors.is_empty() {
            return "-".to_owned();
        }
        self.errors
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The `q`-quantile latency (nearest rank) of the recorded latencies.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = (q * sorted.len() as f64).ceil() as usize;
        sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
    }
}

/// `count` per second over `elapsed` (0 for an empty interval).
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// `mm:ss` (or `h:mm:ss` from an hour on) of a soak's elapsed time, to the second.
pub fn clock(elapsed: Duration) -> String {
    let s = elapsed.as_secs_f64().round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m:02}:{s:02}")
    }
}

/// The change of a daemon's RSS from `from` to `to` KiB: `+1.4 MiB (+9.7%)`, or in KiB
/// under a MiB: `-12 KiB (-0.1%)`.
pub fn rss_change(from: u64, to: u64) -> String {
    let diff = i128::from(to) - i128::from(from);
    let percent = if from > 0 {
        diff as f64 / from as f64 * 100.0
    } else {
        0.0
    };
    if diff.abs() < 1024 {
        format!("{diff:+} KiB ({percent:+.1}%)")
    } else {
        format!("{:+.1} MiB ({percent:+.1}%)", diff as f64 / 1024.0)
    }
}

/// The soak's verdict: why it failed (failed calls, teardowns, other `problems` such as a
/// daemon that went away), or `None` when it passed.
pub fn soak_failure(errors: u64, teardowns: usize, problems: &[String]) -> Option<String> {
    let mut why = Vec::new();
    if errors > 0 {
        why.push(format!("{errors} calls failed"));
    }
    if teardowns > 0 {
        why.push(format!(
            "{teardowns} LB log lines show a runner connection torn down or a runner unreachable"
        ));
    }
    why.extend(problems.iter().cloned());
    (!why.is_empty()).then(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tlb-agent\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  812344 kB\nVmHWM:\t   16012 kB\nVmRSS:\t   14848 kB\nRssAnon:\t    6400 kB\n\
        Threads:\t3\n";

    #[test]
    fn vmrss_is_read_from_a_status_text() {
        assert_eq!(status_kib(STATUS, "VmRSS"), Some(14848));
        assert_eq!(status_kib(STATUS, "VmHWM"), Some(16012));
        // A field whose name starts like another one's is not confused with it.
        assert_eq!(status_kib(STATUS, "Rss"), None);
        assert_eq!(status_kib("Name:\tx\n", "VmRSS"), None);
        assert_eq!(mib(14848), "14.5");
        assert_eq!(mib(0), "0.0");
    }

    #[test]
    fn this_process_has_an_rss_and_open_fds() {
        let sample = ProcSample::read(Some(std::process::id()));
        assert!(sample.rss_kib.is_some_and(|k| k > 0), "{sample:?}");
        assert!(sample.fds.is_some_and(|n| n >= 3), "{sample:?}");
        assert_eq!(ProcSample::read(None).show(), "? MiB ? fds");
    }

    #[test]
    fn teardown_lines_are_counted_among_others() {
        let log = "\
2025-01-01T00:00:00Z  INFO lb_agent: listening on 127.0.0.1:8080
2025-01-01T00:00:01Z  WARN fn_nodepool::client: runner unreachable; probing until it answers runner=127.0.0.1:9000
2025-01-01T00:00:02Z  WARN fn_lb::invoke: call slow
2025-01-01T00:00:03Z  WARN h2::proto::streams::streams: locally-reset streams reached limit (1024)
2025-01-01T00:00:04Z  INFO fn_lb::front: call placed runner=127.0.0.1:9000
";
        assert_eq!(count_teardowns(log), 2);
        assert_eq!(
            teardown_lines(log)
                .next()
                .map(|l| l.contains("unreachable")),
            Some(true)
        );
        assert_eq!(count_teardowns(""), 0);
        for line in [
            "DEBUG h2: received GOAWAY",
            "hyper: Connection Error: broken pipe",
            "the peer said Go Away",
        ] {
            assert!(is_teardown_line(line), "{line}");
        }
        assert!(!is_teardown_line("INFO call placed"));
        // As a terminal-coloured log writes it.
        let coloured = "\u{1b}[2m2026-11-30T22:51:40Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \
            \u{1b}[2mfn_nodepool::client\u{1b}[0m\u{1b}[2m:\u{1b}[0m runner \u{1b}[1munreachable\u{1b}[0m";
        assert!(is_teardown_line(coloured));
        assert_eq!(
            strip_ansi(coloured),
            "2026-11-30T22:51:40Z  WARN fn_nodepool::client: runner unreachable"
        );
    }

    #[test]
    fn interval_arithmetic() {
        let mut interval = Tally::default();
        for ms in 1..=98 {
            interval.record(None, 4096, Duration::from_millis(ms));
        }
        interval.record(Some("http 502"), 4096, Duration::from_millis(99));
        interval.record(Some("hung"), 4096, Duration::from_millis(100));
        assert_eq!(interval.calls, 100);
        assert_eq!(interval.error_count(), 2);
        assert_eq!(interval.payload_bytes, 98 * 4096);
        assert_eq!(interval.errors_by_kind(), "http 502: 1, hung: 1");
        assert_eq!(interval.quantile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(interval.quantile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(Tally::default().quantile(0.5), None);
        assert_eq!(Tally::default().errors_by_kind(), "-");

        let mut total = Tally::default();
        total.merge(&interval);
        total.merge(&interval);
        assert_eq!(total.calls, 200);
        assert_eq!(total.errors.get("hung"), Some(&2));
        assert!(total.latencies.is_empty(), "the total keeps no latencies");

        assert_eq!(per_second(3000, Duration::from_secs(30)), 100.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        assert_eq!(clock(Duration::from_secs(90)), "01:30");
        assert_eq!(clock(Duration::from_millis(29_600)), "00:30");
        assert_eq!(clock(Duration::from_secs(3725)), "1:02:05");
        assert_eq!(rss_change(10240, 10650), "+410 KiB (+4.0%)");
        assert_eq!(rss_change(10240, 10240), "+0 KiB (+0.0%)");
        assert_eq!(rss_change(10240, 10228), "-12 KiB (-0.1%)");
        assert_eq!(rss_change(10240, 11776), "+1.5 MiB (+15.0%)");
        assert_eq!(rss_change(2048, 1024), "-1.0 MiB (-50.0%)");
    }

    #[test]
    fn the_soak_fails_on_errors_teardowns_or_vanished_daemons() {
        assert_eq!(soak_failure(0, 0, &[]), None);
        assert_eq!(soak_failure(3, 0, &[]), Some("3 calls failed".to_owned()));
        let why = soak_failure(0, 2, &["runner 1 went away".to_owned()]).unwrap_or_default();
        assert!(why.contains("2 LB log lines"), "{why}");
        assert!(why.ends_with("; runner 1 went away"), "{why}");
        let why = soak_failure(1, 0, &[]).unwrap_or_default();
        assert_eq!(why, "1 calls failed");
    }
}
