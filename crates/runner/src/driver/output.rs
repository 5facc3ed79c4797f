//! Logging a function's stdout and stderr: read line by line in a background task and
//! emitted as `tracing` events with target `function`. Lines are cut at [`MAX_LINE`] bytes
//! (the rest of the line is skipped) so that a function cannot make the runner buffer
//! without bound.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// What identifies an instance in logs.
#[derive(Debug)]
pub(crate) struct Labels {
    pub(crate) app: String,
    pub(crate) function: String,
    pub(crate) instance: String,
    /// The call that started the instance.
    pub(crate) call_id: String,
}

/// Longest line kept, in bytes; longer lines are truncated.
pub(crate) const MAX_LINE: usize = 4096;

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Reads `reader` to its end, logging each line. Ends when the function (and everything it
/// started that holds the pipe) has exited.
pub(crate) async fn log_lines<R>(reader: R, stream: Stream, labels: Arc<Labels>)
where
    R: AsyncRead + Unpin,
{
    let mut reader = BufReader::new(reader);
    let mut lines = LineSplitter::new(MAX_LINE);
    let emit = |line: &[u8], truncated: bool| log_line(&labels, stream, line, truncated);
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::debug!(instance = %labels.instance, stream = stream.as_str(), error = %e, "cannot read function output");
                break;
            }
        };
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        lines.push(chunk, emit);
        reader.consume(n);
    }
    lines.finish(emit);
}

/// Logs one line of a function's output.
pub(crate) fn log_line(labels: &Labels, stream: Stream, line: &[u8], truncated: bool) {
    tracing::info!(
        target: "function",
        app = %labels.app,
        function = %labels.function,
        instance = %labels.instance,
        call_id = %labels.call_id,
        stream = stream.as_str(),
        truncated,
        "{}",
        String::from_utf8_lossy(line)
    );
}

/// Splits bytes into lines of at most `max` bytes, keeping no more than that in memory.
#[derive(Debug)]
pub(crate) struct LineSplitter {
    max: usize,
    line: Vec<u8>,
    truncated: bool,
}

impl LineSplitter {
    pub(crate) fn new(max: usize) -> Self {
        LineSplitter {
            max,
            line: Vec::new(),
            truncated: false,
        }
    }

    /// Feeds `chunk`; calls `emit(line, truncated)` for every completed line (without its
    /// `\n` or `\r\n`).
    pub(crate) fn push(&mut self, mut chunk: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            self.keep(&chunk[..end]);
            self.emit(&mut emit);
            chunk = &chunk[end + 1..];
        }
        self.keep(chunk);
    }

    /// Emits a last line that had no newline.
    pub(crate) fn finish(&mut self, mut emit: impl FnMut(&[u8], bool)) {
        if !self.line.is_empty() || self.truncated {
            self.emit(&mut emit);
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = self.max - self.line.len();
        if bytes.len() > room {
            self.truncated = true;
        }
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn emit(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        emit(line, self.truncated);
        self.line.clear();
        self.truncated = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut splitter = LineSplitter::new(max);
        for chunk in chunks {
            splitter.push(chunk, |l, t| {
                out.push((String::from_utf8_lossy(l).into_owned(), t))
            });
        }
        splitter.finish(|l, t| out.push((String::from_utf8_lossy(l).into_owned(), t)));
        out
    }

    #[test]
    fn splits_across_chunks() {
        assert_eq!(
            split(100, &[b"hel", b"lo\nwor", b"ld\r\n\nlast"]),
            [
                ("hello".to_owned(), false),
                ("world".to_owned(), false),
                (String::new(), false),
                ("last".to_owned(), false)
            ]
        );
        assert!(split(100, &[b""]).is_empty());
        assert_eq!(split(100, &[b"a\n"]), [("a".to_owned(), false)]);
    }

    #[test]
    fn truncates_long_lines_and_recovers() {
        let long = vec![b'x'; 10_000];
        let out = split(8, &[&long, &long, b"\nshort\n"]);
        assert_eq!(
            out,
            [("xxxxxxxx".to_owned(), true), ("short".to_owned(), false)]
        );
        let mut splitter = LineSplitter::new(8);
        splitter.push(&long, |_, _| {});
        assert!(splitter.line.capacity() < 1024, "memory stays bounded");
    }
}
