//! Options shared by every daemon, and the one way a daemon reports bad configuration.

use std::ffi::OsString;
use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};

/// Exit status for invalid configuration (the same as clap's usage errors).
pub const CONFIG_ERROR_EXIT: i32 = 2;

/// Logging, listening and shutdown options common to all daemons.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Log filter: a level (`info`, `debug`) or `tracing` directives (`info,fn_runner=debug`).
    #[arg(long, env = "FN_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "FN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Address to bind listeners to.
    #[arg(long, env = "FN_LISTEN_ADDR", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub listen_addr: IpAddr,
    /// Upper bound for a graceful shutdown (draining in-flight work) after SIGTERM/SIGINT.
    #[arg(long, env = "FN_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Port for the Prometheus scrape endpoint (`GET /metrics`, plain HTTP) on the listen
    /// address. Unset: no metrics listener is opened.
    #[arg(long, env = "FN_METRICS_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub metrics_port: Option<u16>,
    /// Threads that run the daemon's work [default: the CPUs this process may use]. Where
    /// daemons share a few cores (an lb-agent and a runner on one small machine), 1 each is
    /// faster: a call's wake-ups then stay on one thread instead of crossing between cores.
    #[arg(long, env = "FN_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// lb-agent and pure-runner: shards, each a thread with its own runtime, every connection
    /// served by one of them (see `fn_lifecycle::shards`), 1 to 256, or `auto` for one per
    /// CPU this process may use. Where one thread per daemon leaves CPUs idle under many
    /// calls at once, one shard per CPU fills them. Each shard is one thread, so
    /// FN_WORKER_THREADS must then be unset or 1.
    #[arg(long, env = "FN_SHARDS", default_value = "1", value_parser = parse_shards)]
    pub shards: u16,
}

impl CommonArgs {
    /// The worker threads of the daemon's main runtime: `FN_WORKER_THREADS`, or 1 (a
    /// current-thread runtime, shard 0) when `FN_SHARDS` is above 1.
    ///
    /// # Errors
    /// When both ask for more than one thread: a shard is one thread.
    pub fn runtime_threads(&self) -> Result<Option<std::num::NonZeroUsize>, String> {
        match self.worker_threads {
            Some(n) if self.shards > 1 && n.get() > 1 => Err(format!(
                "FN_SHARDS: each of the {} shards is one thread; leave FN_WORKER_THREADS \
                 unset or set it to 1 (it is {n})",
                self.shards
            )),
            _ if self.shards > 1 => Ok(std::num::NonZeroUsize::new(1)),
            threads => Ok(threads),
        }
    }

    /// The socket address for a listener on `port`.
    pub fn listen_on(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.listen_addr, port)
    }
}

/// `FN_SHARDS`: a count from 1 to [`MAX_SHARDS`](crate::shards::MAX_SHARDS), or `auto`.
fn parse_shards(text: &str) -> Result<u16, String> {
    let max = crate::shards::MAX_SHARDS;
    if text.trim().eq_ignore_ascii_case("auto") {
        return Ok(auto_shards());
    }
    match text.trim().parse::<u16>() {
        Ok(n) if (1..=max).contains(&usize::from(n)) => Ok(n),
        _ => Err(format!(
            "`{text}` is not a number of shards: give 1 to {max}, or auto (one per CPU)"
        )),
    }
}

/// `FN_SHARDS=auto`: one shard per CPU this process may use (its affinity and its cgroup's
/// CPU quota, as the standard library counts them), at most
/// [`MAX_SHARDS`](crate::shards::MAX_SHARDS); 1 when that cannot be read.
fn auto_shards() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    u16::try_from(cpus.min(crate::shards::MAX_SHARDS)).unwrap_or(1)
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The longest duration any setting takes: far past any sensible value, and short enough
/// that a deadline made from it (`Instant::now() + d`, or the sum of two settings) cannot
/// overflow and panic.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600); // humantime's year

/// Parses a humantime duration (`500ms`, `30s`, `2m`) of at most [`MAX_DURATION`].
///
/// # Errors
/// A message saying what a valid value looks like.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (expected a duration such as 500ms, 30s or 2m)"))?;
    if duration > MAX_DURATION {
        return Err(format!(
            "{s:?} is longer than 100 years, the most any setting takes"
        ));
    }
    Ok(duration)
}

/// A parser of durations (as [`parse_duration`]) of at least `min`, for a setting below
/// which nothing would work; `why` says what needs the time.
pub fn duration_at_least(
    min: Duration,
    why: &'static str,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let duration = parse_duration(s)?;
        if duration < min {
            return Err(format!("{s:?} is below {min:?}: {why}"));
        }
        Ok(duration)
    }
}

/// A value that must say something: blank is refused rather than passed on (an empty
/// network name, say, means the engine's default to Docker, not "none").
///
/// # Errors
/// When `s` is empty or only blanks.
pub fn non_blank(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("is empty; give a value or leave the variable unset".to_owned());
    }
    Ok(s.to_owned())
}

/// Parses a comma-separated list, dropping empty items and surrounding blanks.
pub fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses command line and environment into `C`, or exits: `--help`/`--version` print and
/// exit 0; anything invalid prints one line naming the `FN_*` variable and exits 2.
pub fn parse_or_exit<C: CommandFactory + FromArgMatches>() -> C {
    match try_parse_from::<C, _, _>(std::env::args_os()) {
        Ok(c) => c,
        Err(ParseOutcome::Exit(e)) => e.exit(),
        Err(ParseOutcome::Invalid(line)) => exit_config_error(line),
    }
}

/// The outcome of a failed parse.
#[derive(Debug)]
pub enum ParseOutcome {
    /// Help or version was asked for: print it and exit 0.
    Exit(clap::Error),
    /// A one-line configuration error, naming the variable where there is one.
    Invalid(String),
}

/// Like [`parse_or_exit`] but returns the outcome (tests call this with their own args).
///
/// # Errors
/// [`ParseOutcome`] when the arguments do not parse.
pub fn try_parse_from<C, I, T>(args: I) -> Result<C, ParseOutcome>
where
    C: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut cmd = C::command();
    let matches = match cmd.try_get_matches_from_mut(args) {
        Ok(m) => m,
        Err(e) => return Err(classify(&cmd, e)),
    };
    C::from_arg_matches(&matches).map_err(|e| classify(&cmd, e))
}

fn classify(cmd: &clap::Command, err: clap::Error) -> ParseOutcome {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return ParseOutcome::Exit(err);
    }
    let rendered = err.to_string();
    let first = rendered
        .lines()
        .next()
        .unwrap_or("invalid configuration")
        .trim_start_matches("error: ")
        .to_owned();
    // Name the environment variable behind the offending flag, since operators configure
    // the daemons through the environment.
    let var = cmd.get_arguments().find_map(|arg| {
        let long = arg.get_long()?;
        let env = arg.get_env()?;
        first
            .contains(&format!("--{long} "))
            .then(|| env.to_string_lossy().into_owned())
            .or_else(|| {
                first
                    .contains(&format!("--{long}'"))
                    .then(|| env.to_string_lossy().into_owned())
            })
    });
    // clap puts the values a setting takes on a line of its own, which is not kept.
    let valid = match err.get(clap::error::ContextKind::ValidValue) {
        Some(clap::error::ContextValue::Strings(values)) if !values.is_empty() => {
            format!(" (one of: {})", values.join(", "))
        }
        _ => String::new(),
    };
    ParseOutcome::Invalid(match var {
        Some(var) => format!("{var}: {first}{valid}"),
        None => format!("{first}{valid}"),
    })
}

/// Prints `error: <err>` on one line and exits with status 2.
pub fn exit_config_error(err: impl Display) -> ! {
    let line = err.to_string().replace('\n', " ");
    // What was logged before it (a warning about the same settings) first; a stderr that
    // takes nothing would hold this line, and the exit, for ever.
    if crate::logging::flush() {
        eprintln!("error: {line}");
    }
    std::process::exit(CONFIG_ERROR_EXIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
        #[arg(long, env = "FN_TEST_PORT_XYZ", default_value_t = 9000)]
        port: u16,
    }

    #[test]
    fn a_bad_choice_names_the_variable_and_the_choices() {
        let parsed: Result<Cli, _> = try_parse_from(["x", "--log-format", "yaml"]);
        let Err(ParseOutcome::Invalid(message)) = parsed else {
            panic!("yaml is no log format");
        };
        assert!(
            message.starts_with("FN_LOG_FORMAT: ")
                && message.contains("'yaml'")
                && message.ends_with("(one of: text, json)"),
            "{message}"
        );
    }

    #[test]
    fn defaults_parse() {
        let cli: Cli = try_parse_from(["x"]).expect("defaults");
        assert_eq!(cli.common.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(cli.common.listen_on(cli.port).to_string(), "0.0.0.0:9000");
        assert_eq!(cli.common.log_format, LogFormat::Text);
        assert_eq!(cli.common.metrics_port, None);
    }

    #[test]
    fn a_metrics_port_parses_and_a_bad_one_names_the_variable() {
        let cli: Cli = try_parse_from(["x", "--metrics-port", "9464"]).expect("valid");
        assert_eq!(cli.common.metrics_port, Some(9464));
        let Err(ParseOutcome::Invalid(line)) =
            try_parse_from::<Cli, _, _>(["x", "--metrics-port", "http"])
        else {
            panic!("expected an invalid-configuration outcome");
        };
        assert!(line.starts_with("FN_METRICS_PORT: "), "{line}");
        // Port 0 would listen on a port the kernel picks, which no one could find.
        let Err(ParseOutcome::Invalid(line)) =
            try_parse_from::<Cli, _, _>(["x", "--metrics-port", "0"])
        else {
            panic!("port 0 accepted");
        };
        assert!(line.starts_with("FN_METRICS_PORT: "), "{line}");
    }

    #[test]
    fn durations_are_bounded() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("100y").map(|d| d <= MAX_DURATION), Ok(true));
        for huge in ["18446744073709551615s", "101y"] {
            let err = parse_duration(huge).expect_err(huge);
            assert!(err.contains("100 years"), "{err}");
        }
        let at_least = duration_at_least(Duration::from_millis(100), "a dial takes time");
        assert_eq!(at_least("100ms"), Ok(Duration::from_millis(100)));
        let err = at_least("0s").expect_err("0s");
        assert!(err.contains("below 100ms: a dial takes time"), "{err}");
        assert!(at_least("soon").is_err());
        assert_eq!(non_blank("none"), Ok("none".to_owned()));
        assert!(non_blank(" ").is_err() && non_blank("").is_err());
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let Err(ParseOutcome::Invalid(line)) =
            try_parse_from::<Cli, _, _>(["x", "--shutdown-timeout", "soon"])
        else {
            panic!("expected an invalid-configuration outcome");
        };
        assert!(line.starts_with("FN_SHUTDOWN_TIMEOUT: "), "{line}");
        assert!(!line.contains('\n'));

        let Err(ParseOutcome::Invalid(line)) =
            try_parse_from::<Cli, _, _>(["x", "--port", "99999"])
        else {
            panic!("expected an invalid-configuration outcome");
        };
        assert!(line.starts_with("FN_TEST_PORT_XYZ: "), "{line}");
    }

    #[test]
    fn shards_are_one_thread_each() {
        let threads = |args: &[&str]| {
            let cli: Cli = try_parse_from(args.iter().copied()).expect("valid");
            cli.common.runtime_threads().map(|t| t.map(|n| n.get()))
        };
        assert_eq!(threads(&["x"]), Ok(None));
        assert_eq!(threads(&["x", "--worker-threads", "3"]), Ok(Some(3)));
        assert_eq!(threads(&["x", "--shards", "2"]), Ok(Some(1)));
        assert_eq!(
            threads(&["x", "--shards", "2", "--worker-threads", "1"]),
            Ok(Some(1))
        );
        let Err(line) = threads(&["x", "--shards", "2", "--worker-threads", "2"]) else {
            panic!("two threads per shard accepted");
        };
        assert!(line.starts_with("FN_SHARDS: "), "{line}");
        let cli: Cli = try_parse_from(["x", "--shards", "auto"]).expect("auto");
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(usize::from(cli.common.shards), cpus.min(256));
        assert_eq!(super::auto_shards(), cli.common.shards);
        let cli: Cli = try_parse_from(["x", "--shards", "AUTO"]).expect("any case");
        assert_eq!(usize::from(cli.common.shards), cpus.min(256));
        for bad in ["0", "257", "two", "-1", ""] {
            let arg = format!("--shards={bad}");
            let Err(ParseOutcome::Invalid(line)) = try_parse_from::<Cli, _, _>(["x", &arg]) else {
                panic!("FN_SHARDS={bad} accepted");
            };
            assert!(line.starts_with("FN_SHARDS: "), "{line}");
            assert!(line.contains("1 to 256, or auto"), "{line}");
        }
    }

    #[test]
    fn worker_threads_default_to_the_runtime_s_choice_and_0_is_refused() {
        let cli: Cli = try_parse_from(["x"]).expect("defaults");
        assert_eq!(cli.common.worker_threads, None);
        let cli: Cli = try_parse_from(["x", "--worker-threads", "1"]).expect("valid");
        assert_eq!(cli.common.worker_threads.map(|n| n.get()), Some(1));
        let Err(ParseOutcome::Invalid(line)) =
            try_parse_from::<Cli, _, _>(["x", "--worker-threads", "0"])
        else {
            panic!("expected an invalid-configuration outcome");
        };
        assert!(line.starts_with("FN_WORKER_THREADS: "), "{line}");
    }

    #[test]
    fn help_is_not_an_error() {
        assert!(matches!(
            try_parse_from::<Cli, _, _>(["x", "--help"]),
            Err(ParseOutcome::Exit(_))
        ));
    }

    #[test]
    fn lists_and_durations() {
        assert_eq!(parse_list(" a:1, ,b:2,"), vec!["a:1", "b:2"]);
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
