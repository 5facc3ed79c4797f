//! Settings of the docker control plane and what runner containers share with the npm,
//! settled once at start: the network, the certificates and the npm id ([`Placement`]),
//! taken from the configuration and, for what it leaves open, from the npm's own container.
//! Every problem found here is a configuration error naming its variable
//! ([`DockerSetupError`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use fn_tls::{TlsArgs, TlsMode};

use super::SelfView;

/// Where runner containers get the certificates from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertsSource {
    /// A named volume.
    Volume(String),
    /// An absolute path on the Docker host.
    Bind(String),
    /// Swarm secrets mounted at these file names in [`SECRETS_DIR`] (swarm only): the npm's
    /// own TLS files are secrets there, and runner services get the same secrets at the
    /// same paths: those the npm's own service mounts there, else those named as the files
    /// (see the swarm engine).
    Secrets(Vec<String>),
}

/// Where swarm mounts secrets in a task's containers.
pub const SECRETS_DIR: &str = "/run/secrets";

/// Settings only the swarm control plane has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwarmConfig {
    /// Placement constraints of runner services (`FN_SWARM_CONSTRAINTS`), such as
    /// `node.labels.fn==runner`.
    pub constraints: Vec<String>,
}

/// The npm's TLS files, handed to runners by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// Whether all three files are swarm secrets (in [`SECRETS_DIR`]).
    fn in_secrets_dir(&self) -> bool {
        [&self.cert, &self.key, &self.ca]
            .iter()
            .all(|p| p.parent() == Some(Path::new(SECRETS_DIR)))
    }

    /// The files' names: where the secrets are mounted (their targets), and the secrets'
    /// names when the npm's own service does not say which secrets they are.
    fn secret_names(&self) -> Vec<String> {
        [&self.cert, &self.key, &self.ca]
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    }

    /// The one directory holding all three files (it is mounted into every runner).
    fn dir(&self) -> Result<PathBuf, DockerSetupError> {
        let dirs: Vec<Option<&Path>> = [&self.cert, &self.key, &self.ca]
            .iter()
            .map(|p| p.parent().filter(|d| d.is_absolute()))
            .collect();
        match dirs.as_slice() {
            [Some(a), Some(b), Some(c)] if a == b && b == c => Ok(a.to_path_buf()),
            _ => Err(DockerSetupError::Certs(format!(
                "with FN_CONTROL_PLANE=docker, FN_NODE_CERT, FN_NODE_CERT_KEY and \
                 FN_NODE_CERT_AUTHORITY must be absolute paths in one directory, which is \
                 mounted into every runner (got {}, {}, {})",
                self.cert.display(),
                self.key.display(),
                self.ca.display()
            ))),
        }
    }
}

/// The Docker engine runners get for their docker driver: the engine's socket and a
/// directory for function containers' sockets, both host paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerEngine {
    /// Host path of the engine's socket; mounted at [`RUNNER_ENGINE_SOCKET`] in runners.
    pub socket: String,
    /// Host directory of function containers' directories; mounted at the same path.
    pub iofs_dir: String,
}

/// Where a runner finds the engine it is given.
pub const RUNNER_ENGINE_SOCKET: &str = "/var/run/docker.sock";

/// Settings of the docker control plane.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Image runners are created from (`FN_DOCKER_RUNNER_IMAGE`).
    pub runner_image: String,
    /// Network runners join (`FN_DOCKER_NETWORK`); `None`: the npm container's network.
    pub network: Option<String>,
    /// Volume name or absolute host path holding the certificates
    /// (`FN_DOCKER_CERTS_VOLUME`); `None`: the npm container's own mount.
    pub certs: Option<String>,
    /// Value of the npm label (`FN_DOCKER_NPM_ID`); `None`: the network's name.
    pub npm_id: Option<String>,
    /// Each runner's `FN_MAX_MEMORY_MB` (`FN_RUNNER_MEMORY_MB`).
    pub runner_memory_mb: u64,
    /// How the npm talks to runners (health checks).
    pub tls: TlsMode,
    /// The npm's TLS files, given to runners; `None` with `FN_INSECURE`.
    pub tls_files: Option<TlsFiles>,
    /// Further environment for runners (log level and format, server name, ...).
    pub extra_env: Vec<(String, String)>,
    /// Leave runners running at npm shutdown (`FN_DOCKER_KEEP_RUNNERS`).
    pub keep_runners: bool,
    /// The engine given to runners for their docker driver (`FN_DOCKER_RUNNER_ENGINE`).
    pub runner_engine: Option<RunnerEngine>,
    /// `Some` for `FN_CONTROL_PLANE=swarm`: runners are swarm services, not containers.
    pub swarm: Option<SwarmConfig>,
    /// Bound for a new runner to answer health.
    pub start_timeout: Duration,
    /// How long a removed runner may take to stop before it is killed: its drain
    /// (`FN_SHUTDOWN_TIMEOUT`, 30 s) and the clean-up of its instances (up to 5 s), with a
    /// margin. A runner killed sooner leaves its function containers to the npm's sweep.
    pub stop_grace: Duration,
    /// How long a runner may drain at the npm's own shutdown before it is removed
    /// ([`super::super::shutdown_stop_grace`] of the npm's bound).
    pub shutdown_grace: Duration,
}

impl DockerConfig {
    /// Defaults for everything but the image and TLS. The runners get the npm's TLS files
    /// (`args`), server name and insecure flag.
    pub fn new(runner_image: String, tls: TlsMode, args: &TlsArgs) -> Self {
        let tls_files = match (
            &args.node_cert,
            &args.node_cert_key,
            &args.node_cert_authority,
        ) {
            (Some(cert), Some(key), Some(ca)) if !args.insecure => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        };
        // Runners follow the npm's certificate checks and retirement, as on the process
        // plane: a call on a retired LB connection lives as long as the npm's grace says.
        let mut extra_env = crate::config::runner_tls_timing(args);
        if let Some(name) = &args.tls_server_name {
            // Runners dial nothing, but their health probe (fn-probe) verifies this name.
            extra_env.push(("FN_TLS_SERVER_NAME".to_owned(), name.clone()));
        }
        DockerConfig {
            runner_image,
            network: None,
            certs: None,
            npm_id: None,
            runner_memory_mb: 1024,
            tls,
            tls_files,
            extra_env,
            keep_runners: false,
            runner_engine: None,
            swarm: None,
            start_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(40),
            shutdown_grace: super::super::SHUTDOWN_STOP_GRACE,
        }
    }
}

impl DockerConfig {
    /// `docker` or `swarm`, for messages.
    pub fn plane(&self) -> &'static str {
        if self.swarm.is_some() {
            "swarm"
        } else {
            "docker"
        }
    }

    /// The variable naming the runner image.
    pub fn image_var(&self) -> &'static str {
        if self.swarm.is_some() {
            "FN_SWARM_RUNNER_IMAGE"
        } else {
            "FN_DOCKER_RUNNER_IMAGE"
        }
    }

    /// The variable naming the network.
    pub fn network_var(&self) -> &'static str {
        if self.swarm.is_some() {
            "FN_SWARM_NETWORK"
        } else {
            "FN_DOCKER_NETWORK"
        }
    }
}

/// What runners share with the npm, settled at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The network runners join; the npm and the LBs must be on it too.
    pub network: String,
    /// The certificates and the directory they are mounted at; `None` with `FN_INSECURE`.
    pub certs: Option<(CertsSource, String)>,
    /// Value of the [`LABEL_NPM`](super::LABEL_NPM) label.
    pub npm_id: String,
}

/// A setup problem of the docker control plane (configuration: exit 2).
#[derive(Debug, thiserror::Error)]
pub enum DockerSetupError {
    #[error(
        "FN_CONTROL_PLANE={plane}: cannot reach the Docker engine at {reason}. Mount the \
         Docker socket into the npm's container (/var/run/docker.sock) and give the npm's user \
         the socket's group (compose: group_add), or set DOCKER_HOST=unix://<socket>"
    )]
    Engine { plane: &'static str, reason: String },
    #[error(
        "{var}: image {image} is not on the Docker engine; build it with `make images` (or \
         pull it) first"
    )]
    Image { var: &'static str, image: String },
    #[error("{var}: {message}")]
    Network { var: &'static str, message: String },
    #[error("FN_CONTROL_PLANE=swarm: {0}")]
    Swarm(String),
    #[error("FN_DOCKER_CERTS_VOLUME: {0}")]
    Certs(String),
    #[error("Docker Engine API: {0}")]
    Api(String),
}

/// What to do when the runner image is not on the engine the npm talks to: on `docker`,
/// a configuration error (every runner would fail to start); on `swarm`, a warning to log
/// and go on, since the manager need not have the image: nodes pull it themselves when
/// their task starts (the documented registry setup pulls it on the runners' nodes only),
/// and one that cannot rejects the task, which the plane reports.
///
/// # Errors
/// [`DockerSetupError::Image`] on `docker`.
pub fn image_missing(config: &DockerConfig, image: &str) -> Result<String, DockerSetupError> {
    if config.swarm.is_none() {
        return Err(DockerSetupError::Image {
            var: config.image_var(),
            image: image.to_owned(),
        });
    }
    Ok(format!(
        "{}: image {image} is not on this manager; runner services are created with it \
         anyway, and every node that may run one (see FN_SWARM_CONSTRAINTS) must have it or \
         be able to pull it (a node that cannot rejects the runner's task, and the npm removes \
         the service with the task's error in its log)",
        config.image_var()
    ))
}

/// Decides where runners go from the configuration and, for what it leaves open, from the
/// npm's own container (`own`, when the npm runs in one).
///
/// # Errors
/// [`DockerSetupError`] naming the variable to set.
pub fn resolve_placement(
    config: &DockerConfig,
    own: Option<&SelfView>,
) -> Result<Placement, DockerSetupError> {
    let var = config.network_var();
    let network_error = |message: String| DockerSetupError::Network { var, message };
    // Swarm attaches a task that publishes ports to `ingress` as well: never the runners'.
    let own_networks: Vec<&String> = own
        .map(|view| view.networks.iter().filter(|n| *n != "ingress").collect())
        .unwrap_or_default();
    let network = match (non_empty(&config.network), own) {
        (Some(n), _) => n.to_owned(),
        (None, Some(_)) => match own_networks.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(network_error(
                    "required: the npm's container is on no network".into(),
                ));
            }
            many => {
                let names: Vec<&str> = many.iter().map(|n| n.as_str()).collect();
                return Err(network_error(format!(
                    "the npm's container is on several networks ({}); set {var} to the one \
                     the LBs and runners share",
                    names.join(", ")
                )));
            }
        },
        (None, None) => {
            return Err(network_error(
                "required: the npm is not in a container it can inspect, so it cannot take \
                 its own network; set the network the LBs and runners share"
                    .into(),
            ));
        }
    };
    let certs = match &config.tls_files {
        None => None,
        Some(files) if config.swarm.is_some() && files.in_secrets_dir() => Some((
            CertsSource::Secrets(files.secret_names()),
            SECRETS_DIR.to_owned(),
        )),
        Some(files) => {
            let dir = files.dir()?;
            let source = match non_empty(&config.certs) {
                Some(s) if s.starts_with('/') => CertsSource::Bind(s.to_owned()),
                Some(s) => CertsSource::Volume(s.to_owned()),
                None => own
                    .and_then(|view| {
                        view.mounts
                            .iter()
                            .find(|(destination, _)| Path::new(destination) == dir)
                            .map(|(_, source)| source.clone())
                    })
                    .ok_or_else(|| {
                        DockerSetupError::Certs(format!(
                            "not set, and {} (the directory of FN_NODE_CERT) is not a volume \
                             or bind mount of the npm's container; set the volume (or absolute \
                             host path) that holds the certificates",
                            dir.display()
                        ))
                    })?,
            };
            Some((source, dir.display().to_string()))
        }
    };
    let npm_id = non_empty(&config.npm_id).unwrap_or(&network).to_owned();
    Ok(Placement {
        network,
        certs,
        npm_id,
    })
}

/// The trimmed value, if there is one.
fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|s| !s.is_empty())
}
