//! The function catalog (`FN_FUNCTIONS_FILE`, TOML): which functions exist, where they are
//! routed and how they run.
//!
//! A [`Catalog`] is immutable once loaded; [`CatalogHandle`] publishes the current one and
//! swaps in a new one on reload (SIGHUP, [`crate::reload`], which reads the file off the
//! runtime). Calls in flight keep the `Arc<Function>` they resolved, so a reload never
//! disturbs them. A reload that fails validation keeps the old catalog and reports why.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;

/// One function as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub app: String,
    pub name: String,
    /// Path under `/r/{app}`, starting with `/`.
    pub route: String,
    pub command: Vec<String>,
    pub image: Option<String>,
    pub memory_mb: u64,
    /// Calls one instance takes at once (1: Fn's one call per instance).
    pub concurrency: u32,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub lb_group: String,
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    functions: Vec<RawFunction>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    app: String,
    name: String,
    route: Option<String>,
    #[serde(default)]
    command: Vec<String>,
    image: Option<String>,
    memory_mb: Option<u64>,
    concurrency: Option<u32>,
    timeout: Option<String>,
    idle_timeout: Option<String>,
    lb_group: Option<String>,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

/// The least `memory_mb` a function may have: docker refuses a container limit under
/// 6 MiB, and the process driver's wrapper does not start under a much smaller one.
pub const MIN_MEMORY_MB: u64 = 6;

/// Defaults of DESIGN.md's catalog format.
pub const DEFAULT_MEMORY_MB: u64 = 128;
pub const DEFAULT_CONCURRENCY: u32 = 1;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_LB_GROUP: &str = "default";

/// A catalog that could not be loaded: names the file, the function and the field.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: function {function}: field `{field}`: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        function: String,
        field: &'static str,
        reason: String,
    },
    #[error(
        "{}: lists no functions where the catalog has {current}; kept the current catalog (a \
         file caught while being rewritten? replace it by renaming a complete file over it; to \
         take every function away, restart the lb-agent)",
        path.display()
    )]
    Emptied { path: PathBuf, current: usize },
    /// A reload whose read did not return in time (a hung network mount), or could not be
    /// made off the runtime.
    #[error(
        "{}: not read: {source}; kept the current catalog (a hung network mount? check that \
         the file can be read, then send SIGHUP again)",
        path.display()
    )]
    NotRead {
        path: PathBuf,
        source: fn_lifecycle::fs::Unfinished,
    },
}

/// A validated set of functions, indexed for lookup.
#[derive(Debug, Default)]
pub struct Catalog {
    /// app → name → function. Nested rather than keyed by `(app, name)`, so that a lookup
    /// (one per call) borrows the request's strings instead of allocating a key.
    by_name: HashMap<String, HashMap<String, Arc<Function>>>,
    /// app → route → function.
    by_route: HashMap<String, HashMap<String, Arc<Function>>>,
    len: usize,
}

fn valid_env_name(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

impl Catalog {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`CatalogError`] naming the file, and the function and field where one is at fault.
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates catalog `text`; `path` is only used in errors.
    ///
    /// # Errors
    /// [`CatalogError`] naming the file, the function and the field.
    pub fn parse(path: &Path, text: &str) -> Result<Self, CatalogError> {
        let file: FileFormat = toml::from_str(text).map_err(|e| CatalogError::Parse {
            path: path.to_owned(),
            message: parse_error(text, &e),
        })?;
        let mut catalog = Catalog::default();
        for (index, raw) in file.functions.into_iter().enumerate() {
            let label = if raw.app.is_empty() || raw.name.is_empty() {
                format!("#{}", index + 1)
            } else {
                format!("{}/{}", raw.app, raw.name)
            };
            let invalid = |field: &'static str, reason: String| CatalogError::Invalid {
                path: path.to_owned(),
                function: label.clone(),
                field,
                reason,
            };
            let function = validate(raw, &invalid)?;
            if catalog.by_name(&function.app, &function.name).is_some() {
                return Err(invalid("name", "defined twice".into()));
            }
            if let Some(other) = catalog.by_route(&function.app, &function.route) {
                return Err(invalid(
                    "route",
                    format!("{} is already the route of {}", function.route, other.name),
                ));
            }
            let function = Arc::new(function);
            catalog
                .by_name
                .entry(function.app.clone())
                .or_default()
                .insert(function.name.clone(), Arc::clone(&function));
            catalog
                .by_route
                .entry(function.app.clone())
                .or_default()
                .insert(function.route.clone(), function);
            catalog.len += 1;
        }
        Ok(catalog)
    }

    /// The function routed at `/r/{app}{route}`.
    pub fn by_route(&self, app: &str, route: &str) -> Option<Arc<Function>> {
        self.by_route.get(app)?.get(route).cloned()
    }

    /// The function `app/name` (for `/invoke/{app}/{function}`).
    pub fn by_name(&self, app: &str, name: &str) -> Option<Arc<Function>> {
        self.by_name.get(app)?.get(name).cloned()
    }

    /// Every function's (app, name).
    pub fn names(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_name
            .iter()
            .flat_map(|(app, names)| names.keys().map(move |name| (app.as_str(), name.as_str())))
    }

    /// Every LB group a function of the catalog is in.
    pub fn lb_groups(&self) -> BTreeSet<&str> {
        self.by_name
            .values()
            .flat_map(HashMap::values)
            .map(|function| function.lb_group.as_str())
            .collect()
    }

    /// Number of functions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no functions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn validate(
    raw: RawFunction,
    invalid: &dyn Fn(&'static str, String) -> CatalogError,
) -> Result<Function, CatalogError> {
    if !fn_protocol::valid_name(&raw.app) {
        return Err(invalid(
            "app",
            format!("{:?} must be 1-128 of [A-Za-z0-9._-], not . or ..", raw.app),
        ));
    }
    if !fn_protocol::valid_name(&raw.name) {
        return Err(invalid(
            "name",
            format!(
                "{:?} must be 1-128 of [A-Za-z0-9._-], not . or ..",
                raw.name
            ),
        ));
    }
    let route = raw.route.unwrap_or_else(|| format!("/{}", raw.name));
    if !route.starts_with('/') || route.len() < 2 || route.contains("//") || route.ends_with('/') {
        return Err(invalid(
            "route",
            format!("{route:?} must start with / and name a path, e.g. \"/echo\""),
        ));
    }
    if route
        .chars()
        .any(|c| c.is_control() || c == '?' || c == '#' || c == ' ')
    {
        return Err(invalid(
            "route",
            format!("{route:?} contains characters not allowed in a path"),
        ));
    }
    // Clients resolve dot segments before they send a path (RFC 3986, 5.2.4): `/a/../b`
    // arrives as `/b`, so such a route could never be called as written.
    if route
        .split('/')
        .any(|segment| matches!(segment, "." | ".."))
    {
        return Err(invalid(
            "route",
            format!("{route:?} has a . or .. segment, which clients remove before they send it"),
        ));
    }
    // A client percent-encodes anything but ASCII, and the LB decodes only the escapes of
    // the characters a route may hold before matching: such a route could never be called.
    if !route.is_ascii() || route.contains('%') {
        return Err(invalid(
            "route",
            format!(
                "{route:?} must be ASCII without '%': clients percent-encode other characters, \
                 and paths are matched with only the escapes of route characters decoded"
            ),
        ));
    }
    // Only what clients send raw in a path: a request target may not carry `<` or a
    // backtick; browsers (the WHATWG URL standard's path set) and HTTP libraries
    // percent-encode `"`, `{` and `}`, and browsers turn `\` into `/`; `?` and `#` end the
    // path. Such a route was called by curl alone.
    if let Some(bad) = route.chars().find(|&c| !is_path_char(c)) {
        return Err(invalid(
            "route",
            format!(
                "{route:?} contains {bad:?}, which clients percent-encode, change or may not \
                 send: use letters, digits, / and -._~!$&'()*+,;=:@|^[]"
            ),
        ));
    }
    if raw.command.is_empty() && raw.image.is_none() {
        return Err(invalid(
            "command",
            "give a command (process driver) or an image (docker driver)".into(),
        ));
    }
    if raw.image.as_deref() == Some("") {
        return Err(invalid(
            "image",
            "is empty; leave it out to use the command".into(),
        ));
    }
    if raw.image.is_some() && !raw.command.is_empty() {
        // A runner would run the command and never the image.
        return Err(invalid(
            "image",
            "is given with a command: give one of them (a command runs as a process, an \
             image as a container)"
                .into(),
        ));
    }
    // What a runner would refuse on every call of this function, refused here once.
    let definition = fn_protocol::call::Definition {
        route: &route,
        command: &raw.command,
        image: raw.image.as_deref(),
        config: &raw.config,
    };
    if let Err(e) = definition.check() {
        use fn_protocol::call::InvalidCall;
        let (field, reason) = match e {
            InvalidCall::Missing(field) => (field, "is missing or empty".to_owned()),
            InvalidCall::TooLong { field, len, max } => (
                field,
                format!("is too long: {len} where at most {max} is accepted"),
            ),
            InvalidCall::Invalid { field, reason } => (field, reason),
        };
        let field = if field == "command or image" {
            "command"
        } else {
            field
        };
        return Err(invalid(field, reason));
    }
    let memory_mb = raw.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
    if memory_mb < MIN_MEMORY_MB {
        return Err(invalid(
            "memory_mb",
            format!(
                "{memory_mb} is less than the least a function can run in, {MIN_MEMORY_MB} \
                 (docker's smallest container limit; a process under a smaller cgroup limit \
                 is killed before it starts)"
            ),
        ));
    }
    let max = fn_protocol::call::MAX_MEMORY_MB;
    if memory_mb > max {
        return Err(invalid(
            "memory_mb",
            format!("{memory_mb} is more than the most accepted, {max} (2^40 MB)"),
        ));
    }
    let concurrency = raw.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    let max = fn_protocol::call::MAX_CONCURRENCY;
    if !(1..=max).contains(&concurrency) {
        return Err(invalid(
            "concurrency",
            format!("{concurrency} must be between 1 and {max}"),
        ));
    }
    let duration = |field: &'static str, value: Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(s) => match humantime::parse_duration(&s) {
            // At least 1ms: the wire carries whole milliseconds, rounded down (a 500us
            // idle timeout would arrive as 0 and end every instance after its call).
            Ok(d) if d >= Duration::from_millis(1) && d <= fn_protocol::call::MAX_TIMEOUT => Ok(d),
            Ok(_) => Err(invalid(field, format!("{s:?} must be between 1ms and 1h"))),
            Err(e) => Err(invalid(
                field,
                format!("{s:?} is not a duration ({e}); use e.g. 30s"),
            )),
        },
    };
    let timeout = duration("timeout", raw.timeout, DEFAULT_TIMEOUT)?;
    let idle_timeout = duration("idle_timeout", raw.idle_timeout, DEFAULT_IDLE_TIMEOUT)?;
    let lb_group = raw.lb_group.unwrap_or_else(|| DEFAULT_LB_GROUP.to_owned());
    if !fn_protocol::valid_name(&lb_group) {
        return Err(invalid(
            "lb_group",
            format!("{lb_group:?} must be 1-128 of [A-Za-z0-9._-], not . or .."),
        ));
    }
    if let Some(key) = raw.config.keys().find(|k| !valid_env_name(k)) {
        return Err(invalid(
            "config",
            format!("{key:?} is not a valid environment variable name"),
        ));
    }
    Ok(Function {
        app: raw.app,
        name: raw.name,
        route,
        command: raw.command,
        image: raw.image,
        memory_mb,
        concurrency,
        timeout,
        idle_timeout,
        lb_group,
        config: raw.config,
    })
}

/// The current catalog, swapped atomically on reload.
#[derive(Debug)]
pub struct CatalogHandle {
    path: PathBuf,
    /// Read on every call, written on reload: readers clone the `Arc` and let go at once.
    current: RwLock<Arc<Catalog>>,
}

impl CatalogHandle {
    /// Loads `path` for the first time.
    ///
    /// # Errors
    /// When the file cannot be read or is invalid.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, CatalogError> {
        let path = path.into();
        let catalog = Catalog::load(&path)?;
        Ok(CatalogHandle {
            path,
            current: RwLock::new(Arc::new(catalog)),
        })
    }

    /// A handle over an already built catalog (tests).
    pub fn from_catalog(path: impl Into<PathBuf>, catalog: Catalog) -> Self {
        CatalogHandle {
            path: path.into(),
            current: RwLock::new(Arc::new(catalog)),
        }
    }

    /// The catalog now.
    pub fn current(&self) -> Arc<Catalog> {
        let guard = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&guard)
    }

    /// The catalog's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts `catalog`, loaded again from [`Self::path`], in use; on error the old catalog
    /// stays. A file with no functions does not replace a catalog that has some: an empty
    /// file is far more often one caught while it is being rewritten than an intent to
    /// answer every call 404. The file is read by the caller ([`crate::reload`] does it off
    /// the runtime): this only swaps.
    ///
    /// # Errors
    /// [`CatalogError::Emptied`].
    pub fn replace(&self, catalog: Catalog) -> Result<usize, CatalogError> {
        let count = catalog.len();
        let mut guard = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if count == 0 && !guard.is_empty() {
            return Err(CatalogError::Emptied {
                path: self.path.clone(),
                current: guard.len(),
            });
        }
        *guard = Arc::new(catalog);
        Ok(count)
    }
}

/// A TOML error as a line for the log: where (line and column) and what, without the
/// offending line itself, which toml's own text quotes and which may hold a function's
/// secrets (a password in `config` with a bad escape, say).
fn parse_error(text: &str, e: &toml::de::Error) -> String {
    let what = without_values(&e.message().trim().replace('\n', " "));
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("TOML error at line {line}, column {column}: {what}")
        }
        None => format!("TOML error: {what}"),
    }
}

/// A deserializer's message without the value it found: serde names it (``invalid type:
/// integer `12345678`, expected a string``, `invalid value: string "s3cr3t"`, ``unknown
/// variant `x` ``), and a value in a catalog may be a secret. What was expected stays: it
/// comes from the catalog's schema, not from the file.
fn without_values(message: &str) -> String {
    const NAMING_A_VALUE: [&str; 3] = ["invalid type:", "invalid value:", "unknown variant"];
    if !NAMING_A_VALUE.iter().any(|p| message.starts_with(p)) {
        return message.to_owned();
    }
    // serde's own "expected" comes last: a value holding the words cannot move the split.
    let (found, expected) = match message.rfind(", expected") {
        Some(at) => message.split_at(at),
        None => (message, ""),
    };
    let mut kept = String::with_capacity(message.len());
    let mut chars = found.chars();
    while let Some(c) = chars.next() {
        match c {
            '`' => {
                // To the closing backtick.
                for c in chars.by_ref() {
                    if c == '`' {
                        break;
                    }
                }
            }
            '"' => {
                // A quoted string as `{:?}` writes it: to the first unescaped quote.
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
            }
            c => kept.push(c),
        }
    }
    format!("{}{expected}", kept.trim_end())
}

/// Whether `c` may stand in a route: an RFC 3986 `pchar` other than a percent-escape, `/`,
/// or one of `|^[]`, which browsers and curl send raw (the WHATWG URL standard leaves them).
/// The front decodes the escape of every one but `/` before it matches a path.
pub(crate) fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/|^[]".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[functions]]
app = "demo"
name = "echo"
route = "/echo"
command = ["fn-echo"]

[[functions]]
app = "demo"
name = "hello"
command = ["fn-hello"]
memory_mb = 64
concurrency = 8
timeout = "5s"
idle_timeout = "1m"
lb_group = "small"
[functions.config]
GREETING = "Hi"
"#;

    #[test]
    fn parses_with_defaults() {
        let c = Catalog::parse(Path::new("f.toml"), GOOD).expect("valid");
        assert_eq!(c.len(), 2);
        let echo = c.by_route("demo", "/echo").expect("routed");
        assert_eq!(echo.memory_mb, DEFAULT_MEMORY_MB);
        assert_eq!(echo.concurrency, 1);
        assert_eq!(echo.timeout, DEFAULT_TIMEOUT);
        assert_eq!(echo.lb_group, "default");
        let hello = c.by_name("demo", "hello").expect("named");
        assert_eq!(hello.route, "/hello", "route defaults to /name");
        assert_eq!(hello.idle_timeout, Duration::from_secs(60));
        assert_eq!(hello.concurrency, 8);
        assert_eq!(hello.config["GREETING"], "Hi");
        assert!(c.by_route("demo", "/nope").is_none());
        assert!(c.by_route("other", "/echo").is_none());
    }

    #[test]
    fn a_name_or_route_defined_twice_in_one_app_is_refused() {
        let one = |app: &str, name: &str, route: &str| {
            format!(
                "[[functions]]\napp = \"{app}\"\nname = \"{name}\"\nroute = \"{route}\"\ncommand = [\"x\"]\n"
            )
        };
        let twice_named = one("demo", "f", "/a") + &one("demo", "f", "/b");
        let err = Catalog::parse(Path::new("c.toml"), &twice_named).expect_err("name twice");
        assert!(err.to_string().contains("field `name`"), "{err}");
        let twice_routed = one("demo", "f", "/a") + &one("demo", "g", "/a");
        let err = Catalog::parse(Path::new("c.toml"), &twice_routed).expect_err("route twice");
        assert!(
            err.to_string().contains("/a is already the route of f"),
            "{err}"
        );
        // The same name and route in another app is another function.
        let two_apps = one("demo", "f", "/a") + &one("other", "f", "/a");
        let c = Catalog::parse(Path::new("c.toml"), &two_apps).expect("two apps");
        assert_eq!(c.len(), 2);
        assert_eq!(c.by_route("other", "/a").expect("routed").app, "other");
        assert_eq!(c.by_name("demo", "f").expect("named").app, "demo");
        // What clients send raw in a path is a route.
        let raw = "/a-b_c.d~e!$&'()*+,;=:@|^[x]/f";
        let c = Catalog::parse(Path::new("c.toml"), &one("demo", "f", raw)).expect("loaded");
        assert!(c.by_route("demo", raw).is_some());
    }

    #[test]
    fn errors_name_file_function_and_field() {
        let cases = [
            ("memory_mb = 0", "function demo/f: field `memory_mb`"),
            // Below docker's smallest limit: no instance could ever start.
            ("memory_mb = 5", "function demo/f: field `memory_mb`"),
            // Below a millisecond: 0 on the wire.
            (
                "idle_timeout = \"500us\"",
                "function demo/f: field `idle_timeout`",
            ),
            ("timeout = \"999us\"", "function demo/f: field `timeout`"),
            // More than any runner may have (2^40 MB): refused, not summed past u64 there.
            (
                "memory_mb = 1099511627777",
                "function demo/f: field `memory_mb`",
            ),
            ("concurrency = 0", "function demo/f: field `concurrency`"),
            ("concurrency = 1001", "function demo/f: field `concurrency`"),
            ("timeout = \"soon\"", "function demo/f: field `timeout`"),
            ("route = \"nope\"", "function demo/f: field `route`"),
            ("route = \"/caf\\u00e9\"", "function demo/f: field `route`"),
            ("route = \"/a%20b\"", "function demo/f: field `route`"),
            // Clients remove dot segments before sending; hyper refuses `<` raw.
            ("route = \"/a/../b\"", "function demo/f: field `route`"),
            ("route = \"/a/.\"", "function demo/f: field `route`"),
            ("route = \"/a<b\"", "function demo/f: field `route`"),
            ("route = \"/a`b\"", "function demo/f: field `route`"),
            ("route = \"/a{b}\"", "function demo/f: field `route`"),
            ("route = \"/a\\\"b\"", "function demo/f: field `route`"),
            ("route = \"/a\\\\b\"", "function demo/f: field `route`"),
            ("route = \"/a?b\"", "function demo/f: field `route`"),
            ("lb_group = \"a b\"", "function demo/f: field `lb_group`"),
            (
                "config = { \"1X\" = \"y\" }",
                "function demo/f: field `config`",
            ),
            // Beside the command: the runner would never run it.
            ("image = \"acme/echo:1\"", "function demo/f: field `image`"),
        ];
        for (line, expected) in cases {
            let text =
                format!("[[functions]]\napp = \"demo\"\nname = \"f\"\ncommand = [\"x\"]\n{line}\n");
            let err = Catalog::parse(Path::new("cat.toml"), &text).expect_err(line);
            let msg = err.to_string();
            assert!(msg.starts_with("cat.toml: "), "{msg}");
            assert!(msg.contains(expected), "{msg} should contain {expected}");
        }
        for (app, name) in [("..", "f"), ("demo", "."), ("demo", "..")] {
            let text =
                format!("[[functions]]\napp = \"{app}\"\nname = \"{name}\"\ncommand = [\"x\"]\n");
            let msg = Catalog::parse(Path::new("c"), &text)
                .expect_err(&text)
                .to_string();
            assert!(msg.contains("must be 1-128 of"), "{msg}");
        }
        let no_command = "[[functions]]\napp = \"demo\"\nname = \"f\"\n";
        let msg = Catalog::parse(Path::new("c"), no_command)
            .expect_err("no command")
            .to_string();
        assert!(msg.contains("field `command`"), "{msg}");
        // Every runner refuses these on every call: refused here, once.
        for program in ["/usr/bin/python3", "../x", "a/../../x"] {
            let outside =
                format!("[[functions]]\napp = \"demo\"\nname = \"f\"\ncommand = [\"{program}\"]\n");
            let msg = Catalog::parse(Path::new("c"), &outside)
                .expect_err(program)
                .to_string();
            assert!(
                msg.contains("field `command`") && msg.contains("functions directory"),
                "{msg}"
            );
        }
        let unknown = "[[functions]]\napp = \"demo\"\nname = \"f\"\ncommand=[\"x\"]\nmemory = 1\n";
        let msg = Catalog::parse(Path::new("c"), unknown)
            .expect_err("unknown")
            .to_string();
        assert!(msg.contains("memory"), "{msg}");
        let dup = format!(
            "{GOOD}\n[[functions]]\napp = \"demo\"\nname = \"echo2\"\nroute = \"/echo\"\ncommand = [\"x\"]\n"
        );
        let msg = Catalog::parse(Path::new("c"), &dup)
            .expect_err("dup route")
            .to_string();
        assert!(msg.contains("demo/echo2: field `route`"), "{msg}");
    }

    /// A syntax or type error names the line and what is wrong, never the line's text: a
    /// function's config may hold secrets, and the error goes to the log.
    #[test]
    fn a_toml_error_does_not_quote_the_file() {
        let broken = [
            "[[functions]]\napp = \"demo\"\nname = \"f\"\ncommand = [\"x\"]\n\
             [functions.config]\nDB_PASSWORD = \"s3cr3t\\q\"\n",
            "[[functions]]\napp = \"demo\"\nname = \"f\"\ncommand = [\"x\"]\n\
             config = { API_KEY = \"s3cr3t\", PORT = 8080 }\n",
            // A value of the wrong type: serde's message names it.
            "[[functions]]\napp = \"demo\"\nname = \"f\"\ncommand = [\"x\"]\n\
             config = { PIN = 98765432 }\n",
            "[[functions]]\napp = \"demo\"\nname = \"f\"\ncommand = \"x --token=s3cr3t\"\n",
            "[[functions]]\napp = \"demo\"\nname = \"f\"\ncommand = [\"x\"]\n\
             memory_mb = \"x, expected s3cr3t\"\n",
            "[[functions]]\napp = \"demo\"\nname = \"f\"\ncommand = [\"x\"]\n\
             memory_mb = \"s3cr3t \\\" s3cr3t\"\n",
        ];
        for text in broken {
            let msg = Catalog::parse(Path::new("cat.toml"), text)
                .expect_err(text)
                .to_string();
            assert!(!msg.contains("s3cr3t"), "{msg}");
            assert!(!msg.contains("98765432"), "{msg}");
            assert!(msg.contains("expected"), "what was expected stays: {msg}");
            assert!(msg.starts_with("cat.toml: TOML error at line "), "{msg}");
        }
        let msg = Catalog::parse(Path::new("c"), "[[functions]]\napp = \n")
            .expect_err("no value")
            .to_string();
        assert!(msg.contains("line 2, column 7"), "{msg}");
    }

    #[test]
    fn bad_reload_keeps_the_old_catalog() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("functions.toml");
        std::fs::write(&path, GOOD).expect("write");
        let handle = CatalogHandle::load(&path).expect("loads");
        let reload = || Catalog::load(&path).and_then(|catalog| handle.replace(catalog));
        let before = handle.current();
        std::fs::write(&path, "[[functions]]\napp = 1\n").expect("write");
        let err = reload().expect_err("bad file");
        assert!(err.to_string().contains("functions.toml"), "{err}");
        assert_eq!(handle.current().len(), 2);
        // A file caught empty while being rewritten.
        std::fs::write(&path, "").expect("write");
        let err = reload().expect_err("empty file");
        assert!(err.to_string().contains("lists no functions"), "{err}");
        assert_eq!(handle.current().len(), 2);
        let extra =
            format!("{GOOD}\n[[functions]]\napp = \"demo\"\nname = \"new\"\ncommand = [\"x\"]\n");
        std::fs::write(&path, extra).expect("write");
        assert_eq!(reload().expect("good file"), 3);
        assert!(handle.current().by_name("demo", "new").is_some());
        assert_eq!(
            before.len(),
            2,
            "holders of the old catalog are undisturbed"
        );
    }
}
