//! The ledger of a reliability suite and its summary table.
//!
//! Every call a suite makes is entered in a [`Ledger`] under a case name: either as a success
//! or as an error of a named kind (`http 502`, `hung`, `body mismatch`, ...), with its latency.
//! The code that sends a call enters its outcome, so the ledgers add up by construction; the
//! suites check them against figures of their own (the calls they meant to send, the calls
//! placed on a killed runner) and against the errors they allow.
//!
//! [`Report::publish`] prints the summary table (per case: calls, successes, errors by kind,
//! p50/p99/max latency) and writes it to `target/reliability/<suite>.<test>.txt`. The table is
//! written straight to the process's stderr handle, not through `eprintln!`: the test harness
//! captures `print!`/`eprint!` output of passing tests, but not writes to the raw handle, so
//! the table shows up in `make test` output without `--nocapture`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// Calls of one case: successes and classified errors, with latencies.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    latencies: Vec<Duration>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// A call is about to be sent.
    pub fn sent(&mut self) {
        self.sent += 1;
    }

    /// A sent call succeeded after `latency`.
    pub fn ok(&mut self, latency: Duration) {
        self.ok += 1;
        self.latencies.push(latency);
    }

    /// A sent call failed with error `kind` after `latency`.
    pub fn error(&mut self, kind: impl Into<String>, latency: Duration) {
        *self.errors.entry(kind.into()).or_default() += 1;
        self.latencies.push(latency);
    }

    /// Adds another ledger's entries (one per worker, merged at the end).
    pub fn merge(&mut self, other: &Ledger) {
        self.sent += other.sent;
        self.ok += other.ok;
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += n;
        }
        self.latencies.extend_from_slice(&other.latencies);
    }

    pub fn sent_count(&self) -> u64 {
        self.sent
    }

    pub fn ok_count(&self) -> u64 {
        self.ok
    }

    /// Errors by kind.
    pub fn errors(&self) -> &BTreeMap<String, u64> {
        &self.errors
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Errors of kinds other than `allowed`.
    pub fn unexpected_errors(&self, allowed: &[&str]) -> BTreeMap<String, u64> {
        self.errors
            .iter()
            .filter(|(kind, _)| !allowed.contains(&kind.as_str()))
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }

    /// The `q`-quantile latency (0.0 ..= 1.0), nearest rank.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return None;
        }
        let rank = (q * sorted.len() as f64).ceil() as usize;
        sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
    }

    pub fn max_latency(&self) -> Option<Duration> {
        self.latencies.iter().max().copied()
    }
}

/// The summary of one reliability test: its cases in order, each with its ledger.
#[derive(Debug)]
pub struct Report {
    suite: String,
    test: String,
    cases: Vec<(String, Ledger)>,
    notes: Vec<String>,
}

impl Report {
    pub fn new(suite: &str, test: &str) -> Self {
        Report {
            suite: suite.to_owned(),
            test: test.to_owned(),
            cases: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a case (a later one with the same name is merged into it).
    pub fn case(&mut self, name: &str, ledger: &Ledger) {
        if let Some((_, existing)) = self.cases.iter_mut().find(|(n, _)| n == name) {
            existing.merge(ledger);
        } else {
            self.cases.push((name.to_owned(), ledger.clone()));
        }
    }

    /// A line printed under the table (a measured time, a bound).
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The table as text.
    pub fn table(&self) -> String {
        let ms = |d: Option<Duration>| {
            d.map_or_else(
                || "-".to_owned(),
                |d| format!("{:.1}ms", d.as_secs_f64() * 1000.0),
            )
        };
        let mut total = Ledger::new();
        let mut rows = vec![[
            "case".to_owned(),
            "calls".to_owned(),
            "ok".to_owned(),
            "errors by kind".to_owned(),
            "p50".to_owned(),
            "p99".to_owned(),
            "max".to_owned(),
        ]];
        let row = |name: &str, l: &Ledger| {
            let errors = if l.errors.is_empty() {
                "-".to_owned()
            } else {
                l.errors
                    .iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            [
                name.to_owned(),
                l.sent.to_string(),
                l.ok.to_string(),
                errors,
                ms(l.quantile(0.50)),
                ms(l.quantile(0.99)),
                ms(l.max_latency()),
            ]
        };
        for (name, ledger) in &self.cases {
            rows.push(row(name, ledger));
            total.merge(ledger);
        }
        rows.push(row(&format!("TOTAL ({} cases)", self.cases.len()), &total));
        let mut widths = [0usize; 7];
        for r in &rows {
            for (w, cell) in widths.iter_mut().zip(r) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = format!(
            "\n== reliability summary: {} / {} ==\n",
            self.suite, self.test
        );
        for (i, r) in rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .zip(widths)
                .enumerate()
                .map(|(col, (cell, w))| {
                    if col == 0 || col == 3 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
            if i == 0 || i + 2 == rows.len() {
                let rule: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(rule));
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "  {note}");
        }
        out
    }

    /// Prints the table (on the raw stderr handle, which the test harness does not capture)
    /// and writes it to `target/reliability/<suite>.<test>.txt`. Returns the file's path.
    pub fn publish(&self) -> PathBuf {
        let table = self.table();
        let bin_dir = fn_test_support::bin_dir();
        let target = bin_dir.canonicalize().unwrap_or(bin_dir);
        let dir = target
            .parent()
            .map_or_else(|| PathBuf::from("target"), std::path::Path::to_path_buf)
            .join("reliability");
        let path = dir.join(format!("{}.{}.txt", self.suite, self.test));
        let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &table));
        let mut stderr = std::io::stderr().lock();
        // Printing is best effort: a closed stderr must not fail the test.
        let _ = stderr.write_all(table.as_bytes());
        let _ = match written {
            Ok(()) => writeln!(stderr, "  (also in {})", path.display()),
            Err(e) => writeln!(stderr, "  (could not write {}: {e})", path.display()),
        };
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_quantiles_and_unexpected_errors() {
        let mut l = Ledger::new();
        for _ in 0..3 {
            l.sent();
        }
        l.ok(Duration::from_millis(1));
        l.error("http 502", Duration::from_millis(2));
        l.error("hung", Duration::from_millis(3));
        assert_eq!((l.sent_count(), l.ok_count(), l.error_count()), (3, 1, 2));
        assert_eq!(l.quantile(0.5), Some(Duration::from_millis(2)));
        assert_eq!(l.quantile(0.99), Some(Duration::from_millis(3)));
        assert_eq!(l.unexpected_errors(&["http 502"]).len(), 1);
    }

    #[test]
    fn table_lists_cases_and_a_total() {
        let mut a = Ledger::new();
        a.sent();
        a.ok(Duration::from_millis(5));
        let mut b = Ledger::new();
        b.sent();
        b.error("http 503", Duration::from_millis(7));
        let mut r = Report::new("suite", "test");
        r.case("a", &a);
        r.case("b", &b);
        r.note("a note");
        let t = r.table();
        assert!(t.contains("http 503: 1"), "{t}");
        assert!(t.contains("TOTAL (2 cases)"), "{t}");
        assert!(t.contains("a note"), "{t}");
    }
}
