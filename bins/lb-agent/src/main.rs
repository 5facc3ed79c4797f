//! lb-agent: the HTTP front end. Resolves the function of each request from the catalog,
//! places the call on a runner of the function's LB group, streams bodies both ways.

/// jemalloc rather than glibc's malloc, with one arena for all threads (compiled in through
/// `JEMALLOC_SYS_WITH_MALLOC_CONF` in `.cargo/config.toml`). User-space instructions per call
/// fell 9.6% with it (152,735 → 138,044, `make bench-instructions`), nearly all of it
/// `malloc` and `free`. With jemalloc's default of four arenas per CPU the peak RSS under
/// 0–1 MiB bodies rose from about 60 to about 70 MB against the 64 MiB target; with one arena
/// it is where glibc's was (58–64 MB, `fn-load --payload uniform`). docs/performance-log.md,
/// session 16.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fn_lb::{
    CatalogHandle, CatalogReload, ClientLimits, DispatchConfig, Dispatcher, Front, Invoker,
};
use fn_lifecycle::config::{
    CommonArgs, duration_at_least, exit_config_error, parse_duration, parse_or_exit,
};
use fn_lifecycle::metrics::Registry;
use fn_lifecycle::{CancellationToken, Health, Services};
use fn_nodepool::{
    Advertiser, CapacityTracker, ClientConfig, EjectionMetrics, NpmPool, ReportMetrics, RunnerPool,
    StaticPool,
};
use fn_placement::PlacerKind;
use fn_tls::TlsArgs;
use tokio::signal::unix::{SignalKind, signal};

/// HTTP front end of the function dataplane.
#[derive(Debug, Parser)]
#[command(name = "lb-agent", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// HTTP port for invocations and GET /health.
    #[arg(long, env = "FN_PORT", default_value_t = 8080, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Function catalog (TOML). SIGHUP reloads it.
    #[arg(long, env = "FN_FUNCTIONS_FILE")]
    functions_file: Option<PathBuf>,
    /// Placement policy: naive (round-robin), ch (consistent hash) or warm (the ch ring,
    /// reordered by what the runners report: warm instances first, full runners skipped,
    /// loads bounded).
    #[arg(long, env = "FN_PLACER", default_value = "warm")]
    placer: PlacerKind,
    /// The warm placer's ε: a runner may carry up to (1 + ε) times the group's mean calls
    /// in flight before its excess goes to the next runners of the ring (0 to 10).
    #[arg(long, env = "FN_PLACER_EPSILON", default_value_t = fn_placement::DEFAULT_EPSILON)]
    placer_epsilon: f64,
    /// How long a call may wait for a runner with room before 503 (at least 100ms).
    #[arg(long, env = "FN_PLACER_TIMEOUT", default_value = "10s",
          value_parser = duration_at_least(MIN_NETWORK_WAIT, "a runner must have time to answer an offer"))]
    placer_timeout: Duration,
    /// The share of a call's timeout it may spend waiting for a runner (above 0, at most 1):
    /// past it the call gets 503, so that a 504 always means the function ran too long.
    #[arg(long, env = "FN_PLACER_WAIT_SHARE", default_value_t = 0.5)]
    placer_wait_share: f64,
    /// Runners (host:port, comma-separated) serving every LB group; used when
    /// FN_NPM_ADDRESS is not set.
    #[arg(long, env = "FN_RUNNER_ADDRESSES", value_delimiter = ',')]
    runner_addresses: Vec<String>,
    /// The npm (host:port): runner lists per LB group come from it, and capacity adverts go
    /// to it.
    #[arg(long, env = "FN_NPM_ADDRESS")]
    npm_address: Option<String>,
    /// Time between capacity adverts to the npm (at least 100ms).
    #[arg(long, env = "FN_ADVERTISE_INTERVAL", default_value = "1s",
          value_parser = duration_at_least(MIN_NETWORK_WAIT, "adverts go at this interval"))]
    advertise_interval: Duration,
    /// Largest request body accepted, in bytes; larger gets 413.
    #[arg(long, env = "FN_MAX_REQUEST_BODY", default_value_t = 32 * 1024 * 1024)]
    max_request_body: u64,
    /// Longest pause in a request body still arriving; past it the call ends with 408 (and
    /// the function's work with it).
    #[arg(long, env = "FN_CLIENT_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    client_body_timeout: Duration,
    /// Bound for connecting to a runner, or to the npm (at least 100ms).
    #[arg(long, env = "FN_RUNNER_CONNECT_TIMEOUT", default_value = "2s",
          value_parser = duration_at_least(MIN_NETWORK_WAIT, "a connection and its TLS handshake take time"))]
    runner_connect_timeout: Duration,
    /// Bound for a runner to acknowledge a TryCall before the call moves on (at least 100ms).
    #[arg(long, env = "FN_RUNNER_ACK_TIMEOUT", default_value = "5s",
          value_parser = duration_at_least(MIN_NETWORK_WAIT, "a runner must have time to answer an offer"))]
    runner_ack_timeout: Duration,
    /// Failures in a row (connect, transport, no acknowledgement in time) after which a
    /// runner is ejected: no calls until its health check passes, first after 5s, doubling
    /// with each ejection in a row up to 60s.
    #[arg(long, env = "FN_RUNNER_EJECT_AFTER", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    runner_eject_after: u32,
    /// Most client connections open at once. At the cap a new connection closes the oldest
    /// idle one (or is refused when none is idle). Default: three quarters of the open-file
    /// limit, which lb-agent raises to its hard limit at start.
    #[arg(long, env = "FN_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// After SIGTERM, how long GET /health answers 503 while calls are still taken, so that
    /// an upstream balancer stops sending before the listener closes. Then in-flight calls
    /// get FN_SHUTDOWN_TIMEOUT to finish.
    #[arg(long, env = "FN_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    drain_delay: Duration,
}

/// The least a wait on a peer may be set to: below it a healthy runner or npm on a busy
/// machine could not answer in time, and every call or advert would fail.
const MIN_NETWORK_WAIT: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    let common = cli.common.clone();
    fn_lifecycle::run_daemon(&common, daemon(cli))
}

async fn daemon(cli: Cli) -> ExitCode {
    // First: what loading the configuration warns of (a node certificate its own CA bundle
    // does not trust, one not valid yet) is logged.
    fn_lifecycle::logging::init(&cli.common.log_level, cli.common.log_format)
        .unwrap_or_else(|e| exit_config_error(e));
    let tls = cli.tls.load().unwrap_or_else(|e| exit_config_error(e));
    let Some(functions_file) = &cli.functions_file else {
        exit_config_error("FN_FUNCTIONS_FILE: required (the function catalog, TOML)")
    };
    let catalog = Arc::new(
        CatalogHandle::load(functions_file)
            .unwrap_or_else(|e| exit_config_error(format!("FN_FUNCTIONS_FILE: {e}"))),
    );
    let addresses: Vec<String> = cli
        .runner_addresses
        .iter()
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    let npm_address = cli
        .npm_address
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty());
    if let Some(npm) = npm_address {
        fn_nodepool::pool::check_host_port(npm).unwrap_or_else(|e| {
            exit_config_error(
                e.to_string()
                    .replace("FN_RUNNER_ADDRESSES", "FN_NPM_ADDRESS"),
            )
        });
        if !addresses.is_empty() {
            tracing::warn!(
                "FN_RUNNER_ADDRESSES is not used: FN_NPM_ADDRESS is set, and the npm's lists \
                 are the runners (unset one of them)"
            );
        }
    } else if addresses.is_empty() {
        exit_config_error(
            "FN_RUNNER_ADDRESSES: required unless FN_NPM_ADDRESS is set (runner host:port list)",
        );
    }
    fn_tls::install_crypto_provider();
    fn_tls::warn_if_insecure(&tls);
    if !(cli.placer_wait_share > 0.0 && cli.placer_wait_share <= 1.0) {
        exit_config_error(format!(
            "FN_PLACER_WAIT_SHARE: {} must be above 0 and at most 1 (0.5: half the call's timeout)",
            cli.placer_wait_share
        ));
    }
    if !(0.0..=10.0).contains(&cli.placer_epsilon) {
        exit_config_error(format!(
            "FN_PLACER_EPSILON: {} must be from 0 to 10 (0.25: a runner may carry 25% more than the mean)",
            cli.placer_epsilon
        ));
    }
    let open_files = fn_lifecycle::limits::raise_open_file_limit().in_force;
    let max_connections = match cli.max_connections {
        Some(0) => exit_config_error("FN_MAX_CONNECTIONS: must be at least 1"),
        Some(n) => n,
        None => fn_lb::connections::default_cap(open_files),
    };
    if max_connections as u64 > open_files {
        tracing::warn!(
            max_connections,
            open_files,
            "FN_MAX_CONNECTIONS is above the open-file limit; accepts will fail before the cap is reached"
        );
    }

    let mut registry = Registry::default();
    fn_lifecycle::logging::register_metrics(&mut registry);
    let client_config = ClientConfig {
        connect_timeout: cli.runner_connect_timeout,
        ack_timeout: cli.runner_ack_timeout,
        eject_after: cli.runner_eject_after,
        ejection_metrics: EjectionMetrics::register(&mut registry),
        watch_reports: cli.placer == PlacerKind::Warm,
        report_metrics: ReportMetrics::register(&mut registry),
        ..ClientConfig::default()
    };
    let capacity = CapacityTracker::new();
    let lb_id = uuid::Uuid::new_v4().to_string();
    let mut npm_tasks: Option<(NpmPool, Advertiser)> = None;
    let pool: Arc<dyn RunnerPool> = match npm_address {
        Some(npm) => {
            let pool = NpmPool::new(npm, &tls, client_config.clone(), Duration::from_millis(500))
                .unwrap_or_else(|e| exit_config_error(format!("FN_NPM_ADDRESS: {e}")));
            let advertiser =
                Advertiser::new(&lb_id, capacity.clone(), npm, &tls, cli.advertise_interval)
                    .unwrap_or_else(|e| exit_config_error(format!("FN_NPM_ADDRESS: {e}")));
            npm_tasks = Some((pool.clone(), advertiser));
            Arc::new(pool)
        }
        None => Arc::new(
            StaticPool::new(&addresses, &tls, &client_config)
                .unwrap_or_else(|e| exit_config_error(e)),
        ),
    };
    let dispatcher = Dispatcher::new(
        Arc::clone(&pool),
        cli.placer.build_with_epsilon(cli.placer_epsilon),
        DispatchConfig {
            placer_timeout: cli.placer_timeout,
            wait_share: cli.placer_wait_share,
            ..DispatchConfig::default()
        },
    );
    let cert_watch = fn_tls::watch::CertWatch::for_mode(&tls, &cli.tls, &mut registry)
        .unwrap_or_else(|e| exit_config_error(e));
    if cli.client_body_timeout.is_zero() {
        exit_config_error(
            "FN_CLIENT_BODY_TIMEOUT: must be more than 0 (30s: a body may pause 30 s)",
        );
    }
    let invoker = Invoker::new(dispatcher, capacity, cli.max_request_body, &mut registry)
        .with_body_idle_timeout(cli.client_body_timeout);
    let (health, _grpc_health) = Health::new(&[]);
    let limits = ClientLimits {
        max_connections,
        ..ClientLimits::default()
    };
    let lb_metrics = invoker.metrics().clone();
    let front = Front::with_limits(Arc::clone(&catalog), invoker, health.clone(), limits);

    let listener = match fn_lifecycle::bind(cli.common.listen_on(cli.port), "FN_PORT").await {
        Ok(l) => l,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    let catalog_reload = CatalogReload::new(Arc::clone(&catalog), lb_metrics, pool, &mut registry);
    let metrics = match fn_lifecycle::metrics::listen(&cli.common, registry).await {
        Ok(m) => m,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    // The SIGHUP handler is installed here, before health says SERVING: until then SIGHUP's
    // default action would terminate the process.
    let hangups = signal(SignalKind::hangup());
    let mut services = Services::new(CancellationToken::new())
        .with_health(health.clone())
        .with_drain_delay(cli.drain_delay);
    let shards = match fn_lifecycle::shards::Shards::start(cli.common.shards.into()) {
        Ok(shards) => Arc::new(shards),
        // Out of threads, not a bad setting: the status says failure, not configuration.
        Err(e) => {
            return fn_lifecycle::exit_status(Err(format!(
                "FN_SHARDS: cannot start a shard's thread: {e} (lower FN_SHARDS, or raise the \
                 process's thread limit)"
            )));
        }
    };
    let http_shards = Arc::clone(&shards);
    services.spawn("http", move |cancel| {
        front.serve_sharded(listener, Some(http_shards), cancel)
    });
    if let Some(metrics) = metrics {
        services.spawn("metrics", move |cancel| metrics.serve(cancel));
    }
    if let Some(watch) = cert_watch {
        services.spawn("cert-watch", move |cancel| watch.run(cancel));
    }
    services.spawn("catalog-reload", move |cancel| {
        catalog_reload.run(hangups, cancel)
    });
    if let Some((pool, advertiser)) = npm_tasks {
        services.spawn("npm-runner-lists", move |cancel| pool.run(cancel));
        services.spawn("capacity-advertiser", move |cancel| advertiser.run(cancel));
    }
    let shutdown = match fn_lifecycle::signal::shutdown_signal() {
        Ok(signal) => signal,
        Err(e) => return fn_lifecycle::exit_status(Err(e)),
    };
    health.set_serving().await;
    // With the npm, its lists are the runners; a static list given too is not used.
    let static_runners = npm_address.is_none().then_some(addresses.len());
    tracing::info!(port = cli.port, placer = %cli.placer, lb_id = %lb_id, npm = ?npm_address, runners = ?static_runners, max_connections, shards = cli.common.shards, "lb-agent serving");

    let result = services.run(shutdown, cli.common.shutdown_timeout).await;
    // The shards stop once every service has: connections on them drained first.
    drop(shards);
    fn_lifecycle::exit_status(result)
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use fn_lifecycle::config::{ParseOutcome, try_parse_from};

    /// Waits no peer could meet (every call or advert would fail, or a zero interval would
    /// panic the advertiser) and lengths that would overflow a deadline are refused at start,
    /// naming the variable.
    #[test]
    fn waits_too_short_or_too_long_name_the_variable() {
        let cases = [
            ("--placer-timeout", "0s", "FN_PLACER_TIMEOUT"),
            ("--advertise-interval", "0s", "FN_ADVERTISE_INTERVAL"),
            (
                "--runner-connect-timeout",
                "0s",
                "FN_RUNNER_CONNECT_TIMEOUT",
            ),
            ("--runner-ack-timeout", "50ms", "FN_RUNNER_ACK_TIMEOUT"),
            (
                "--client-body-timeout",
                "18446744073709551615s",
                "FN_CLIENT_BODY_TIMEOUT",
            ),
            ("--drain-delay", "200y", "FN_DRAIN_DELAY"),
        ];
        for (flag, value, var) in cases {
            let parsed = try_parse_from::<Cli, _, _>(["lb-agent", flag, value]);
            let Err(ParseOutcome::Invalid(line)) = parsed else {
                panic!("{flag} {value} was accepted");
            };
            assert!(line.starts_with(&format!("{var}: ")), "{line}");
        }
        let cli = try_parse_from::<Cli, _, _>(["lb-agent", "--runner-ack-timeout", "100ms"])
            .unwrap_or_else(|_| panic!("100ms is enough"));
        assert_eq!(cli.runner_ack_timeout.as_millis(), 100);
    }

    /// The one-arena setting is compiled into jemalloc by `.cargo/config.toml`; a build that
    /// misses it (another cargo configuration, a vendored build) would run with eight arenas
    /// on two CPUs and miss the RSS target unnoticed.
    #[test]
    fn the_allocator_runs_one_arena() {
        let arenas = tikv_jemalloc_ctl::opt::narenas::read().expect("jemalloc answers opt.narenas");
        assert_eq!(
            arenas, 1,
            "JEMALLOC_SYS_WITH_MALLOC_CONF (.cargo/config.toml) not applied"
        );
    }
}
