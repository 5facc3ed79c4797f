//! `tracing` subscriber setup.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Error for an unusable `FN_LOG_LEVEL`.
#[derive(Debug, thiserror::Error)]
#[error("FN_LOG_LEVEL: invalid filter {filter:?}: {reason} (use a level such as info or debug)")]
pub struct LogLevelError {
    filter: String,
    reason: String,
}

/// Installs the global subscriber, writing to stderr: coloured only when stderr is a
/// terminal and `NO_COLOR` is unset or empty (<https://no-color.org>), so logs redirected to a
/// file or collected by a container engine carry no escape codes.
///
/// # Errors
/// When `level` is not a valid filter. A second call in one process is ignored.
pub fn init(level: &str, format: LogFormat) -> Result<(), LogLevelError> {
    let filter = EnvFilter::try_new(level).map_err(|e| LogLevelError {
        filter: level.to_owned(),
        reason: e.to_string(),
    })?;
    let colour = use_colour(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    // try_init fails only when a subscriber is already set (tests); keep that one.
    let _already_set = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// Whether log lines get ANSI colours: only on a terminal, and never when `NO_COLOR` is set
/// to a non-empty value.
fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(
            use_colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None), "a file or a pipe gets no colour");
        assert!(!use_colour(false, Some(OsStr::new("1"))));
    }
}
