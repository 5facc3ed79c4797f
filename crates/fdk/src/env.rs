//! The environment a runner starts a function with, read and validated once at startup.
//!
//! The runner passes the contract (`FN_FORMAT`, `FN_LISTENER`), the function's identity
//! (`FN_APP_NAME`, `FN_FN_NAME`, `FN_MEMORY`, `FN_TYPE`) and the function's config, all as
//! environment variables. [`FnEnv::from_vars`] reads them from any map, so tests never touch the
//! process environment; [`FnEnv::from_env`] reads the real one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::Error;

/// The only format this FDK speaks.
pub const HTTP_STREAM: &str = "http-stream";

/// A validated function environment.
#[derive(Debug, Clone)]
pub struct FnEnv {
    /// Where the runner expects the socket (`lsnr.sock`); the FDK binds a private socket beside
    /// it and links this name to it once it accepts connections.
    listener: PathBuf,
    app_name: String,
    fn_name: String,
    memory_mb: Option<u64>,
    /// Every variable, contract ones included: the function's config is among them, and
    /// nothing tells config keys apart from other variables.
    vars: BTreeMap<String, String>,
}

impl FnEnv {
    /// Reads the process environment (variables that are not UTF-8 are skipped).
    ///
    /// # Errors
    ///
    /// As [`FnEnv::from_vars`].
    pub fn from_env() -> Result<Self, Error> {
        Self::from_vars(
            std::env::vars_os().filter_map(|(key, value)| {
                Some((key.into_string().ok()?, value.into_string().ok()?))
            }),
        )
    }

    /// Reads the environment from `vars`.
    ///
    /// # Errors
    ///
    /// [`Error::FormatMissing`] / [`Error::FormatUnsupported`] unless `FN_FORMAT=http-stream`;
    /// [`Error::ListenerMissing`] / [`Error::ListenerMalformed`] unless `FN_LISTENER` is
    /// `unix:` followed by the absolute path of a file; [`Error::Memory`] if `FN_MEMORY` is set
    /// but not a whole number.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(key, value)| (key.into(), value.into()))
            .collect();
        match vars.get("FN_FORMAT").map(String::as_str) {
            Some(HTTP_STREAM) => {}
            Some(other) => {
                return Err(Error::FormatUnsupported {
                    found: other.to_owned(),
                });
            }
            None => return Err(Error::FormatMissing),
        }
        let listener = parse_listener(vars.get("FN_LISTENER").ok_or(Error::ListenerMissing)?)?;
        let memory_mb = match vars.get("FN_MEMORY") {
            None => None,
            Some(value) => Some(value.trim().parse().map_err(|_| Error::Memory {
                value: value.clone(),
            })?),
        };
        Ok(Self {
            listener,
            app_name: vars.get("FN_APP_NAME").cloned().unwrap_or_default(),
            fn_name: vars.get("FN_FN_NAME").cloned().unwrap_or_default(),
            memory_mb,
            vars,
        })
    }

    /// The socket path the runner connects to (`FN_LISTENER` without `unix:`).
    #[must_use]
    pub fn listener(&self) -> &Path {
        &self.listener
    }

    /// `FN_APP_NAME`, empty when unset.
    #[must_use]
    pub fn app_name(&self) -> &str {
        &self.app_name
    }

    /// `FN_FN_NAME`, empty when unset.
    #[must_use]
    pub fn fn_name(&self) -> &str {
        &self.fn_name
    }

    /// `FN_MEMORY`: the memory the runner granted, in MB.
    #[must_use]
    pub fn memory_mb(&self) -> Option<u64> {
        self.memory_mb
    }

    /// One variable: a config key of the function, or any other variable.
    #[must_use]
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Every variable the function was started with.
    #[must_use]
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }
}

fn parse_listener(value: &str) -> Result<PathBuf, Error> {
    let malformed = |reason| Error::ListenerMalformed {
        value: value.to_owned(),
        reason,
    };
    let path = value
        .strip_prefix("unix:")
        .ok_or_else(|| malformed("only unix: listeners are supported"))?;
    if path.ends_with('/') || Path::new(path).file_name().is_none() {
        return Err(malformed("the path names no socket file"));
    }
    if !Path::new(path).is_absolute() {
        return Err(malformed("the path is not absolute"));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<FnEnv, Error> {
        FnEnv::from_vars(pairs.iter().copied())
    }

    #[test]
    fn reads_the_contract_identity_and_config() {
        let env = env(&[
            ("FN_FORMAT", "http-stream"),
            ("FN_LISTENER", "unix:/tmp/fn-1/lsnr.sock"),
            ("FN_APP_NAME", "shop"),
            ("FN_FN_NAME", "cart"),
            ("FN_MEMORY", "128"),
            ("FN_TYPE", "sync"),
            ("DB_URL", "postgres://db"),
        ])
        .expect("valid environment");
        assert_eq!(env.listener(), Path::new("/tmp/fn-1/lsnr.sock"));
        assert_eq!(env.app_name(), "shop");
        assert_eq!(env.fn_name(), "cart");
        assert_eq!(env.memory_mb(), Some(128));
        assert_eq!(env.var("DB_URL"), Some("postgres://db"));
        assert_eq!(env.var("MISSING"), None);
    }

    #[test]
    fn format_must_be_http_stream() {
        let listener = ("FN_LISTENER", "unix:/tmp/lsnr.sock");
        assert!(matches!(env(&[listener]), Err(Error::FormatMissing)));
        let err = env(&[listener, ("FN_FORMAT", "json")]).expect_err("json is not spoken");
        assert!(matches!(&err, Error::FormatUnsupported { found } if found == "json"));
        assert!(err.to_string().contains("http-stream"), "{err}");
    }

    #[test]
    fn listener_must_be_an_absolute_unix_path_to_a_file() {
        assert!(matches!(
            env(&[("FN_FORMAT", "http-stream")]),
            Err(Error::ListenerMissing)
        ));
        for bad in [
            "/tmp/lsnr.sock",
            "tcp:127.0.0.1:80",
            "unix:",
            "unix:/tmp/dir/",
            "unix:lsnr.sock",
            "unix:/",
        ] {
            let result = env(&[("FN_FORMAT", "http-stream"), ("FN_LISTENER", bad)]);
            assert!(
                matches!(result, Err(Error::ListenerMalformed { .. })),
                "{bad:?} accepted: {result:?}"
            );
        }
    }

    #[test]
    fn memory_must_be_a_number_when_set() {
        let result = env(&[
            ("FN_FORMAT", "http-stream"),
            ("FN_LISTENER", "unix:/tmp/lsnr.sock"),
            ("FN_MEMORY", "lots"),
        ]);
        assert!(matches!(result, Err(Error::Memory { .. })));
    }
}
