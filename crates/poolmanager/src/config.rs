//! The npm's `FN_*` options: which control plane supplies runners ([`ControlPlaneArgs`]) and
//! how the control loop scales ([`ScalingArgs`]), each validated into what the library
//! runs on before any port is bound.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fn_lifecycle::config::parse_duration;
use fn_protocol::call::MAX_MEMORY_MB;
use fn_tls::{TlsArgs, TlsMode};

use crate::ManagerConfig;
use crate::control_plane::ControlPlane;
use crate::control_plane::docker::{DockerConfig, DockerControlPlane, RunnerEngine, SwarmConfig};
use crate::control_plane::process::{ProcessConfig, ProcessControlPlane};
use crate::control_plane::static_list::StaticControlPlane;

/// Invalid npm configuration: one line naming the variable and what to do. Exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// `FN_CONTROL_PLANE` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ControlPlaneKind {
    /// A fixed list of runner addresses (FN_RUNNER_ADDRESSES).
    Static,
    /// Local pure-runner processes on loopback ports.
    Process,
    /// Runner containers through the Docker Engine API (FN_DOCKER_*).
    Docker,
    /// One swarm service per runner through a swarm manager (FN_SWARM_*, and FN_DOCKER_*
    /// where they apply).
    Swarm,
}

/// Where runners come from.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlPlaneArgs {
    /// Where runners come from.
    #[arg(long, env = "FN_CONTROL_PLANE", value_enum, default_value_t = ControlPlaneKind::Process)]
    pub control_plane: ControlPlaneKind,
    /// Capacity of one runner in MB (a spawned runner's FN_MAX_MEMORY_MB): 1 to
    /// [`MAX_MEMORY_MB`], the runner's own bound.
    #[arg(long, env = "FN_RUNNER_MEMORY_MB", default_value_t = 1024)]
    pub runner_memory_mb: u64,
    /// static: the runner addresses (host:port, comma-separated).
    #[arg(long, env = "FN_RUNNER_ADDRESSES", value_delimiter = ',')]
    pub runner_addresses: Vec<String>,
    /// process: the pure-runner executable [default: pure-runner next to this npm].
    #[arg(long, env = "FN_RUNNER_BINARY")]
    pub runner_binary: Option<PathBuf>,
    /// process: the functions directory given to spawned runners (their FN_FUNCTIONS_DIR).
    #[arg(long, env = "FN_RUNNER_FUNCTIONS_DIR")]
    pub runner_functions_dir: Option<PathBuf>,
    /// process: where spawned runners are recorded (for adoption after a restart) and log.
    #[arg(
        long,
        env = "FN_RUNNER_STATE_DIR",
        default_value = "/tmp/fn-npm-runners"
    )]
    pub runner_state_dir: PathBuf,
    /// process: leave the ready runners running at shutdown, with their records, for the
    /// next npm to adopt.
    #[arg(long, env = "FN_PROCESS_KEEP_RUNNERS", default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub process_keep_runners: bool,
    /// docker: the image runner containers are created from.
    #[arg(
        long,
        env = "FN_DOCKER_RUNNER_IMAGE",
        default_value = "fn-dataplane/pure-runner:latest"
    )]
    pub docker_runner_image: String,
    /// docker: the network runner containers join [default: the npm container's network].
    #[arg(long, env = "FN_DOCKER_NETWORK")]
    pub docker_network: Option<String>,
    /// docker: volume (or absolute host path) with the certificates, mounted into runners at
    /// the directory of FN_NODE_CERT [default: what the npm's container mounts there].
    #[arg(long, env = "FN_DOCKER_CERTS_VOLUME")]
    pub docker_certs_volume: Option<String>,
    /// docker: this npm's label on its runner containers [default: the network's name].
    #[arg(long, env = "FN_DOCKER_NPM_ID")]
    pub docker_npm_id: Option<String>,
    /// docker: leave runner containers running at shutdown, for the next npm to adopt.
    #[arg(long, env = "FN_DOCKER_KEEP_RUNNERS", default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub docker_keep_runners: bool,
    /// docker: the engine's socket on the host (such as /var/run/docker.sock), given to every
    /// runner so that it runs functions given as images (its docker driver). Unset: runners
    /// get no engine and refuse image functions. The socket is root on the host: give it
    /// only to runners you trust as much as the npm.
    #[arg(long, env = "FN_DOCKER_RUNNER_ENGINE")]
    pub docker_runner_engine: Option<String>,
    /// docker, with FN_DOCKER_RUNNER_ENGINE: the host directory where runners make their
    /// function containers' directories; mounted into each runner at the same path.
    #[arg(
        long,
        env = "FN_DOCKER_RUNNER_IOFS_DIR",
        default_value = "/tmp/fn-iofs"
    )]
    pub docker_runner_iofs_dir: String,
    /// swarm: the image runner services run.
    #[arg(
        long,
        env = "FN_SWARM_RUNNER_IMAGE",
        default_value = "fn-dataplane/pure-runner:latest"
    )]
    pub swarm_runner_image: String,
    /// swarm: the overlay network runner services join [default: the npm's own].
    #[arg(long, env = "FN_SWARM_NETWORK")]
    pub swarm_network: Option<String>,
    /// swarm: placement constraints of runner services (comma-separated, such as
    /// node.labels.fn==runner).
    #[arg(long, env = "FN_SWARM_CONSTRAINTS", value_delimiter = ',')]
    pub swarm_constraints: Vec<String>,
}

/// How the control loop scales each LB group.
#[derive(Debug, Clone, clap::Args)]
pub struct ScalingArgs {
    /// Runners `default` and every retained LB group keep without demand.
    #[arg(long, env = "FN_MIN_RUNNERS", default_value_t = 0)]
    pub min_runners: usize,
    /// A group no LB has advertised for this long keeps no FN_MIN_RUNNERS and is forgotten.
    #[arg(long, env = "FN_GROUP_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub group_retention: Duration,
    /// Most runners per LB group.
    #[arg(long, env = "FN_MAX_RUNNERS", default_value_t = 10)]
    pub max_runners: usize,
    /// Most runners in all LB groups together.
    #[arg(long, env = "FN_MAX_TOTAL_RUNNERS", default_value_t = 100)]
    pub max_total_runners: usize,
    /// How long demand must stay low before runners drain.
    #[arg(long, env = "FN_SCALE_DOWN_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub scale_down_delay: Duration,
    /// A draining runner is removed after this even with calls in flight.
    #[arg(long, env = "FN_MAX_DRAIN_TIME", default_value = "5m", value_parser = parse_duration)]
    pub max_drain_time: Duration,
    /// An LB silent for this long is forgotten, with its demand.
    #[arg(long, env = "FN_LB_PURGE_AFTER", default_value = "5s", value_parser = parse_duration)]
    pub lb_purge_after: Duration,
    /// Most runners provisioned per group per control-loop tick.
    #[arg(long, env = "FN_PROVISION_BATCH", default_value_t = 4)]
    pub provision_batch: usize,
    /// Time between control-loop ticks.
    #[arg(long, env = "FN_SCALE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub scale_interval: Duration,
}

impl ScalingArgs {
    /// The control loop's settings; `shutdown_bound` is the npm's own
    /// `FN_SHUTDOWN_TIMEOUT`, within which its provisionings stop when it stops.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable out of range.
    pub fn manager_config(&self, shutdown_bound: Duration) -> Result<ManagerConfig, ConfigError> {
        if self.max_runners == 0 || self.min_runners > self.max_runners {
            return Err(ConfigError(
                "FN_MAX_RUNNERS: must be at least 1 and at least FN_MIN_RUNNERS".into(),
            ));
        }
        if self.max_total_runners < self.max_runners {
            return Err(ConfigError(
                "FN_MAX_TOTAL_RUNNERS: must be at least FN_MAX_RUNNERS".into(),
            ));
        }
        if self.provision_batch == 0 {
            return Err(ConfigError("FN_PROVISION_BATCH: must be at least 1".into()));
        }
        if self.lb_purge_after.is_zero() {
            return Err(ConfigError(
                "FN_LB_PURGE_AFTER: must be longer than 0 (an LB would be forgotten as soon as it \
                 advertised)"
                    .into(),
            ));
        }
        let drain_settle = ManagerConfig::default().drain_settle;
        if self.max_drain_time < drain_settle {
            return Err(ConfigError(format!(
                "FN_MAX_DRAIN_TIME: must be at least {drain_settle:?} (a draining runner is \
                 given that long for the LBs to take it off their lists; shorter, every \
                 drained runner would be removed with its calls still running)"
            )));
        }
        if self.scale_interval.is_zero() {
            return Err(ConfigError(
                "FN_SCALE_INTERVAL: must be longer than 0".into(),
            ));
        }
        // The time a (re)started npm takes to hear its LBs again: a shorter retention would
        // forget groups (and their FN_MIN_RUNNERS) before their LBs could advertise them.
        let relearn = self.lb_purge_after + self.scale_interval * 2;
        if self.group_retention < relearn {
            return Err(ConfigError(format!(
                "FN_GROUP_RETENTION: must be at least FN_LB_PURGE_AFTER + 2 x \
                 FN_SCALE_INTERVAL ({relearn:?}), the time LBs take to be heard again after an \
                 npm restart; shorter, groups would be forgotten with their FN_MIN_RUNNERS"
            )));
        }
        Ok(ManagerConfig {
            min_runners: self.min_runners,
            group_retention: self.group_retention,
            max_runners: self.max_runners,
            max_total_runners: self.max_total_runners,
            scale_down_delay: self.scale_down_delay,
            max_drain_time: self.max_drain_time,
            lb_purge_after: self.lb_purge_after,
            provision_batch: self.provision_batch,
            tick: self.scale_interval,
            provisioning_stop_bound: crate::manager::provisioning_stop_bound(shutdown_bound),
            ..ManagerConfig::default()
        })
    }
}

/// Each of the static plane's addresses is `host:port`, and none comes twice (a second
/// copy would be a slot no runner ever fills, and an LB skips an address without a port).
fn check_addresses(addresses: &[String]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for address in addresses {
        let port = address
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .filter(|port| *port != 0);
        if port.is_none() {
            return Err(ConfigError(format!(
                "FN_RUNNER_ADDRESSES: {address:?} is not host:port (for example runner-1:9190)"
            )));
        }
        if !seen.insert(address) {
            return Err(ConfigError(format!(
                "FN_RUNNER_ADDRESSES: {address:?} is listed twice"
            )));
        }
    }
    Ok(())
}

impl ControlPlaneArgs {
    /// Checks what can be checked without touching anything (exit 2 before any port is
    /// bound).
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.runner_memory_mb == 0 {
            return Err(ConfigError(
                "FN_RUNNER_MEMORY_MB: must be at least 1".into(),
            ));
        }
        if self.runner_memory_mb > MAX_MEMORY_MB {
            // The runner refuses an FN_MAX_MEMORY_MB above the bound: every runner spawned
            // with it would fail to start.
            return Err(ConfigError(format!(
                "FN_RUNNER_MEMORY_MB: {} is more than the most accepted, {MAX_MEMORY_MB} \
                 (2^40 MB, a runner's FN_MAX_MEMORY_MB bound); give one runner's capacity in MB",
                self.runner_memory_mb
            )));
        }
        match self.control_plane {
            ControlPlaneKind::Static if self.addresses().is_empty() => Err(ConfigError(
                "FN_RUNNER_ADDRESSES: required with FN_CONTROL_PLANE=static".into(),
            )),
            ControlPlaneKind::Static => check_addresses(&self.addresses()),
            ControlPlaneKind::Process if self.runner_functions_dir.is_none() => Err(ConfigError(
                "FN_RUNNER_FUNCTIONS_DIR: required with FN_CONTROL_PLANE=process".into(),
            )),
            _ => Ok(()),
        }
    }

    fn addresses(&self) -> Vec<String> {
        self.runner_addresses
            .iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// Builds the control plane. `tls_args` are the npm's own TLS options (runners get the
    /// same files); `runner_env` is passed to every runner (log level and format);
    /// `shutdown_bound` is the npm's own `FN_SHUTDOWN_TIMEOUT`, within which its runners are
    /// stopped when it stops.
    ///
    /// # Errors
    /// [`ConfigError`] when the control plane cannot be set up (missing runner binary,
    /// unreachable Docker engine, ...).
    pub async fn build(
        &self,
        tls_args: &TlsArgs,
        tls: &TlsMode,
        runner_env: Vec<(String, String)>,
        shutdown_bound: std::time::Duration,
    ) -> Result<Arc<dyn ControlPlane>, ConfigError> {
        let stop_grace = crate::control_plane::shutdown_stop_grace(shutdown_bound);
        self.validate()?;
        let error = |e: &dyn std::fmt::Display| ConfigError(e.to_string());
        Ok(match self.control_plane {
            ControlPlaneKind::Static => Arc::new(StaticControlPlane::new(
                self.addresses(),
                self.runner_memory_mb,
            )),
            ControlPlaneKind::Process => {
                let functions_dir = self.runner_functions_dir.clone().unwrap_or_default();
                let runner_binary = self.runner_binary.clone().unwrap_or_else(|| {
                    std::env::current_exe()
                        .ok()
                        .and_then(|exe| exe.parent().map(|dir| dir.join("pure-runner")))
                        .unwrap_or_else(|| PathBuf::from("pure-runner"))
                });
                let mut config = ProcessConfig::new(
                    runner_binary,
                    absolute(&functions_dir),
                    absolute(&self.runner_state_dir),
                    tls.clone(),
                );
                config.runner_memory_mb = self.runner_memory_mb;
                config.tls_env = tls_env(tls_args);
                config.extra_env = runner_env;
                config.stop_grace = stop_grace;
                config.keep_runners = self.process_keep_runners;
                Arc::new(
                    ProcessControlPlane::new(config)
                        .await
                        .map_err(|e| error(&e))?,
                )
            }
            ControlPlaneKind::Docker | ControlPlaneKind::Swarm => {
                let swarm = self.control_plane == ControlPlaneKind::Swarm;
                let (image, network) = if swarm {
                    (&self.swarm_runner_image, &self.swarm_network)
                } else {
                    (&self.docker_runner_image, &self.docker_network)
                };
                let mut config = DockerConfig::new(image.clone(), tls.clone(), tls_args);
                config.network = network.clone();
                config.certs = self.docker_certs_volume.clone();
                config.npm_id = self.docker_npm_id.clone();
                config.runner_memory_mb = self.runner_memory_mb;
                config.keep_runners = self.docker_keep_runners;
                config.runner_engine = self
                    .docker_runner_engine
                    .clone()
                    .filter(|socket| !socket.is_empty())
                    .map(|socket| RunnerEngine {
                        socket,
                        iofs_dir: self.docker_runner_iofs_dir.clone(),
                    });
                config.swarm = swarm.then(|| SwarmConfig {
                    constraints: self
                        .swarm_constraints
                        .iter()
                        .map(|c| c.trim().to_owned())
                        .filter(|c| !c.is_empty())
                        .collect(),
                });
                config.extra_env.extend(runner_env);
                config.shutdown_grace = stop_grace;
                Arc::new(
                    DockerControlPlane::connect(config)
                        .await
                        .map_err(|e| error(&e))?,
                )
            }
        })
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// The environment giving spawned runners the npm's own TLS identity.
fn tls_env(args: &TlsArgs) -> Vec<(String, String)> {
    if args.insecure {
        return vec![("FN_INSECURE".to_owned(), "true".to_owned())];
    }
    [
        ("FN_NODE_CERT", &args.node_cert),
        ("FN_NODE_CERT_KEY", &args.node_cert_key),
        ("FN_NODE_CERT_AUTHORITY", &args.node_cert_authority),
    ]
    .into_iter()
    .filter_map(|(k, v)| {
        v.as_ref()
            .map(|p| (k.to_owned(), absolute(p).display().to_string()))
    })
    .chain(runner_tls_timing(args))
    .collect()
}

/// The npm's certificate check interval and retirement grace, for the runners it starts.
/// An interval of 0 (check only on SIGHUP) is not passed on: nothing sends the runners a
/// SIGHUP, so they keep their own default and still see rotated files.
pub(crate) fn runner_tls_timing(args: &TlsArgs) -> Vec<(String, String)> {
    let mut env = Vec::with_capacity(2);
    if !args.tls_reload_interval.is_zero() {
        env.push((
            "FN_TLS_RELOAD_INTERVAL".to_owned(),
            humantime::format_duration(args.tls_reload_interval).to_string(),
        ));
    }
    env.push((
        "FN_TLS_RETIRE_GRACE".to_owned(),
        humantime::format_duration(args.tls_retire_grace).to_string(),
    ));
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        control_plane: ControlPlaneArgs,
        #[command(flatten)]
        scaling: ScalingArgs,
    }

    fn parse(args: &[&str]) -> Cli {
        let mut all = vec!["npm"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("parses")
    }

    #[test]
    fn defaults_are_valid_for_the_static_plane_with_addresses() {
        let cli = parse(&[
            "--control-plane",
            "static",
            "--runner-addresses",
            "a:1, b:2,",
        ]);
        cli.control_plane.validate().expect("valid");
        assert_eq!(cli.control_plane.addresses(), ["a:1", "b:2"]);
        let m = cli
            .scaling
            .manager_config(Duration::from_secs(30))
            .expect("valid");
        assert_eq!(
            (m.min_runners, m.max_runners, m.provision_batch),
            (0, 10, 4)
        );
        // Provisionings stop within their bound, and leave the control plane's shutdown at
        // least as long after its runners' stop grace.
        assert_eq!(m.provisioning_stop_bound, Duration::from_millis(2500));
        for npm_bound in [2, 6, 10, 20, 30, 120].map(Duration::from_secs) {
            let wait = cli
                .scaling
                .manager_config(npm_bound)
                .expect("valid")
                .provisioning_stop_bound;
            let grace = crate::control_plane::shutdown_stop_grace(npm_bound);
            assert!(
                wait * 2 <= npm_bound.saturating_sub(grace),
                "{wait:?} for {npm_bound:?}"
            );
            if npm_bound >= Duration::from_secs(6) {
                assert_eq!(wait, Duration::from_millis(2500), "for {npm_bound:?}");
            }
        }
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: [(&[&str], &str); 12] = [
            (
                &["--control-plane", "static", "--runner-addresses", "a:1,a:1"],
                "FN_RUNNER_ADDRESSES: \"a:1\" is listed twice",
            ),
            (
                &["--control-plane", "static", "--runner-addresses", "a:1,b"],
                "FN_RUNNER_ADDRESSES: \"b\" is not host:port",
            ),
            (
                &["--control-plane", "static", "--runner-addresses", ":9190"],
                "FN_RUNNER_ADDRESSES: \":9190\" is not host:port",
            ),
            (
                &["--control-plane", "docker", "--max-drain-time", "1s"],
                "FN_MAX_DRAIN_TIME: must be at least 2s",
            ),
            (&["--control-plane", "static"], "FN_RUNNER_ADDRESSES:"),
            (&["--control-plane", "process"], "FN_RUNNER_FUNCTIONS_DIR:"),
            (
                &["--control-plane", "docker", "--runner-memory-mb", "0"],
                "FN_RUNNER_MEMORY_MB:",
            ),
            (
                &["--control-plane", "docker", "--max-runners", "0"],
                "FN_MAX_RUNNERS:",
            ),
            (
                &["--control-plane", "docker", "--provision-batch", "0"],
                "FN_PROVISION_BATCH:",
            ),
            (
                &["--control-plane", "docker", "--lb-purge-after", "0s"],
                "FN_LB_PURGE_AFTER:",
            ),
            (
                &["--control-plane", "docker", "--max-total-runners", "9"],
                "FN_MAX_TOTAL_RUNNERS:",
            ),
            (
                &["--control-plane", "docker", "--group-retention", "6s"],
                "FN_GROUP_RETENTION: must be at least FN_LB_PURGE_AFTER + 2 x FN_SCALE_INTERVAL (7s)",
            ),
        ];
        for (args, var) in cases {
            let cli = parse(args);
            let err = cli
                .control_plane
                .validate()
                .err()
                .or_else(|| cli.scaling.manager_config(Duration::from_secs(30)).err())
                .unwrap_or_else(|| panic!("{args:?} must be rejected"));
            assert!(
                err.to_string().starts_with(var),
                "{err} should start with {var}"
            );
        }
    }

    /// FN_RUNNER_MEMORY_MB is bounded as the runner's FN_MAX_MEMORY_MB is: above the bound,
    /// every runner the npm spawned would refuse its configuration.
    #[test]
    fn runner_memory_is_bounded_as_the_runners_own() {
        let with = |mb: u64| {
            let mut cli = parse(&["--control-plane", "docker"]);
            cli.control_plane.runner_memory_mb = mb;
            cli.control_plane.validate()
        };
        assert!(with(MAX_MEMORY_MB).is_ok());
        for huge in [MAX_MEMORY_MB + 1, u64::MAX] {
            let error = with(huge).expect_err("above the bound").to_string();
            assert!(
                error.starts_with("FN_RUNNER_MEMORY_MB") && error.contains("2^40"),
                "{error}"
            );
        }
    }

    #[test]
    fn runners_get_the_npm_identity_as_absolute_paths() {
        let args = TlsArgs {
            node_cert: Some("certs/node.pem".into()),
            node_cert_key: Some("/abs/key.pem".into()),
            node_cert_authority: None,
            tls_server_name: None,
            insecure: false,
            tls_reload_interval: std::time::Duration::from_secs(3),
            tls_retire_grace: std::time::Duration::from_secs(120),
        };
        let env = tls_env(&args);
        assert_eq!(env.len(), 4);
        assert!(env[0].1.starts_with('/') && env[0].1.ends_with("certs/node.pem"));
        assert_eq!(
            env[1],
            ("FN_NODE_CERT_KEY".to_owned(), "/abs/key.pem".to_owned())
        );
        assert_eq!(
            env[2],
            ("FN_TLS_RELOAD_INTERVAL".to_owned(), "3s".to_owned()),
            "runners check for rotated certificates as often as the npm"
        );
        assert_eq!(env[3], ("FN_TLS_RETIRE_GRACE".to_owned(), "2m".to_owned()));
        // An npm that checks only on SIGHUP: nothing signals its runners, which keep their
        // own interval.
        let on_sighup = TlsArgs {
            tls_reload_interval: std::time::Duration::ZERO,
            ..args.clone()
        };
        assert!(
            !tls_env(&on_sighup)
                .iter()
                .any(|(k, _)| k == "FN_TLS_RELOAD_INTERVAL")
        );
        let insecure = TlsArgs {
            insecure: true,
            node_cert: None,
            ..args
        };
        assert_eq!(
            tls_env(&insecure),
            [("FN_INSECURE".to_owned(), "true".to_owned())]
        );
    }
}
