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

/// Installs the global subscriber, writing to stderr.
///
/// # Errors
/// When `level` is not a valid filter. A second call in one process is ignored.
pub fn init(level: &str, format: LogFormat) -> Result<(), LogLevelError> {
    let filter = EnvFilter::try_new(level).map_err(|e| LogLevelError {
        filter: level.to_owned(),
        reason: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init fails only when a subscriber is already set (tests); keep that one.
    let _already_set = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}
