//! Reading the report of `fn-hostile` (`system-tests/hostile`): one line per attempt,
//! `<attempt>: denied (<error>)` or `<attempt>: ALLOWED`.

use anyhow::{Context, ensure};

/// Checks that `report` has a row for each of `attempts`, and that each says denied.
///
/// # Errors
/// Naming the first attempt with no row or that was allowed, with the whole report.
pub fn all_denied<'a>(
    report: &str,
    attempts: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<()> {
    for attempt in attempts {
        let line = report
            .lines()
            .find(|l| l.starts_with(attempt))
            .with_context(|| format!("no row for {attempt:?} in\n{report}"))?;
        ensure!(
            line.starts_with(&format!("{attempt}: denied")),
            "the function could {attempt}: {line}\n{report}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_allowed_row_fails_and_denied_rows_pass() {
        let report = "read it: denied (EPERM)\nsignal it: ALLOWED\n";
        assert!(all_denied(report, ["read it"]).is_ok());
        assert!(all_denied(report, ["signal it"]).is_err());
        assert!(all_denied(report, ["trace it"]).is_err());
    }
}
