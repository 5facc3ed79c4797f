//! `make demo` (deploy/demo.sh), one of the README's two commands, run as an operator runs
//! it: in a session of its own with a pseudo-terminal as its controlling terminal
//! (util-linux `setsid --ctty`), so that Ctrl-C and a closed terminal reach it as a
//! terminal sends them.
//!
//! - the calls its banner prints answer as the banner says (they are read from the banner:
//!   a call it prints that stops working fails here);
//! - Ctrl-C (the terminal's `^C`: SIGINT to the whole foreground process group) lets a call
//!   in flight finish, and the script exits 130 leaving no process behind: no lb-agent,
//!   npm, runner or function instance, and no runner's socket directory;
//! - a closed terminal (its hangup: SIGHUP to the script, the session's leader) stops
//!   everything as well, and the script exits 129;
//! - a functions directory given (`FN_DEMO_FUNCTIONS_DIR`) under a shared one, as /tmp,
//!   leaves that one as it was; under one that others may write and is not sticky, or (as
//!   root) one closed to the function users, it is refused.
//!
//! The demo runs the workspace's built binaries through a directory of links (`BIN`), with
//! its state, its functions and its runners' table of function uids in the test's temporary
//! directory, on free ports. Its processes are told from those of other tests by that
//! directory (in their command line or environment) or by the script's session.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use fn_system_tests::{free_port, runner_with_uid_table};
use fn_test_support::workspace_bin;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Bound for the demo to print its banner (the binaries are built already).
const START: Duration = Duration::from_secs(30);
/// Bound for the script to exit once told to stop: calls in flight, the runners' stop (the
/// demo's lb-agent has no drain delay).
const STOP: Duration = Duration::from_secs(40);
/// Bound for each call, curl's `--max-time` (seconds).
const CALL_BOUND: &str = "20";
/// How long the script's processes may take to leave the process table after it exited:
/// a function killed with SIGKILL dies a moment after the signal, a moment that a loaded
/// machine stretches (the wait ends as soon as they are gone).
const GONE: Duration = Duration::from_secs(10);
/// How long after its start a call is taken as reaching its function, on a warm runner: a
/// call that had not reached it at Ctrl-C would find every runner draining (the terminal's
/// SIGINT reaches them too) and get 503. A third of `IN_FLIGHT_SLEEP`, so that the call is
/// still running at Ctrl-C and has seconds to arrive on a loaded machine. (The demo's
/// daemons serve no metrics, which could have told when the call arrived.)
const IN_FLIGHT_AFTER: Duration = Duration::from_secs(4);
/// What the call in flight at Ctrl-C asks `demo/linger` for, in milliseconds.
const IN_FLIGHT_SLEEP: u64 = 12_000;
/// `demo/linger`: fn-sleep with a timeout room for `IN_FLIGHT_SLEEP` (the catalog's
/// `demo/sleep` has 5 s), added to the demo's catalog (`FN_DEMO_FUNCTIONS_FILE`).
const LINGER: &str = "\n[[functions]]\napp = \"demo\"\nname = \"linger\"\n\
                      route = \"/linger\"\ncommand = [\"fn-sleep\"]\nmemory_mb = 128\n\
                      timeout = \"30s\"\n";
/// The banner's first and last words.
const BANNER: &str = "The dataplane is running";
const BANNER_END: &str = "Ctrl-C stops everything.";

/// What the banner promises of a call it prints.
struct Promise {
    /// What picks the call out of the banner's lines.
    call: &'static str,
    /// Its status (`curl -i` shows it), or none for a line that shows bodies only.
    status: Option<u16>,
    /// What its answer holds, and how many times.
    body: &'static str,
    times: usize,
}

/// Every call the banner prints, with what it promises (`#` comments in the banner name a
/// status too, checked against these).
const PROMISES: [Promise; 6] = [
    Promise {
        call: "/r/demo/hello -d 'Ada'",
        status: Some(200),
        body: "Hello, Ada!",
        times: 1,
    },
    Promise {
        call: "/r/demo/echo -H 'Content-Type: text/plain' -d 'echo me'",
        status: Some(200),
        body: "echo me",
        times: 1,
    },
    Promise {
        call: "/invoke/demo/sleep -d 1000",
        status: Some(200),
        body: "slept 1000ms",
        times: 1,
    },
    Promise {
        call: "/r/demo/sleep -d 9000",
        status: Some(504),
        body: "",
        times: 1,
    },
    Promise {
        call: "/r/demo/crash -d x",
        status: Some(502),
        body: "",
        times: 1,
    },
    Promise {
        call: "/r/demo/sleep -d 2000 & done",
        status: None,
        body: "slept 2000ms",
        times: 20,
    },
];

#[test]
fn the_banners_calls_answer_as_it_says_and_ctrl_c_stops_everything() -> anyhow::Result<()> {
    let mut demo = Demo::start()?;
    demo.read_until(BANNER_END, START)?;
    let calls = demo.banner_calls()?;
    if let Err(e) = check_promises(&calls) {
        anyhow::bail!("{e:#}\n{}", demo.report());
    }

    // Ctrl-C with a call in flight, on a runner the calls above left warm.
    let address = format!("http://127.0.0.1:{}/r/demo/linger", demo.lb_port);
    let in_flight = std::thread::spawn(move || {
        let output = curl(&format!("curl -i {address} -d {IN_FLIGHT_SLEEP}"));
        (output, Instant::now())
    });
    std::thread::sleep(IN_FLIGHT_AFTER);
    let sent = Instant::now();
    demo.ctrl_c()?;
    let status = demo.wait_exit(STOP)?;
    let (output, answered) = in_flight
        .join()
        .map_err(|_| anyhow::anyhow!("the call's thread panicked"))?;
    // Every check, so that a failure tells all that went wrong.
    let mut failures = Vec::new();
    match output.and_then(|o| reply(&o)) {
        Ok((200, body)) if body.contains(&format!("slept {IN_FLIGHT_SLEEP}ms")) => {}
        Ok((code, body)) => {
            failures.push(format!("the call in flight at Ctrl-C got {code}: {body}"))
        }
        Err(e) => failures.push(format!("the call in flight at Ctrl-C: {e:#}")),
    }
    if answered <= sent {
        failures.push("the call ended before the Ctrl-C: it was not in flight".into());
    }
    if status.code() != Some(130) {
        failures.push(format!("after Ctrl-C the demo exits 130, not {status}"));
    }
    if demo.screen().contains("a daemon exited") {
        failures.push("after Ctrl-C the demo tells of a daemon that exited".into());
    }
    demo.verdict(failures)
}

#[test]
fn a_closed_terminal_stops_everything() -> anyhow::Result<()> {
    let mut demo = Demo::start()?;
    demo.read_until(BANNER_END, START)?;
    // A runner and a function instance for the hangup to stop.
    let hello = format!(
        "curl -i http://127.0.0.1:{}/r/demo/hello -d you",
        demo.lb_port
    );
    let (code, body) = reply(&curl(&hello)?)?;
    ensure!(code == 200, "hello: {code} {body}\n{}", demo.report());

    demo.hang_up();
    let status = demo.wait_exit(STOP)?;
    let mut failures = Vec::new();
    if status.code() != Some(129) {
        failures.push(format!(
            "after its terminal closed the demo exits 129, not {status}"
        ));
    }
    demo.verdict(failures)
}

/// `FN_DEMO_FUNCTIONS_DIR` in a directory others share, as /tmp (sticky, writable by all):
/// the demo runs its functions from there and leaves the directory above as it was, where it
/// made it 0755 (`FN_DEMO_FUNCTIONS_DIR=/tmp/fns` as root took /tmp's sticky bit and its
/// writability by all; `~/fns` opened the home directory to every user).
#[test]
fn a_functions_dir_given_leaves_the_one_above_it_as_it_was() -> anyhow::Result<()> {
    let mut demo = Demo::start_with(|root| {
        let dir = root.join("shared");
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
        Ok(dir.join("functions"))
    })?;
    demo.read_until(BANNER_END, START)?;
    let hello = format!(
        "curl -i http://127.0.0.1:{}/r/demo/hello -d you",
        demo.lb_port
    );
    let answer = curl(&hello).and_then(|o| reply(&o));
    let dir = demo.root.path().join("shared");
    let mode = std::fs::metadata(&dir)?.permissions().mode() & 0o7777;
    demo.ctrl_c()?;
    let status = demo.wait_exit(STOP)?;
    let mut failures = Vec::new();
    if mode != 0o1777 {
        failures.push(format!(
            "the demo made {} {mode:o}, not 1777",
            dir.display()
        ));
    }
    match answer {
        Ok((200, _)) => {}
        Ok((code, body)) => failures.push(format!("hello got {code}: {body}")),
        Err(e) => failures.push(format!("hello: {e:#}")),
    }
    if status.code() != Some(130) {
        failures.push(format!("after Ctrl-C the demo exits 130, not {status}"));
    }
    demo.verdict(failures)
}

/// `FN_DEMO_FUNCTIONS_DIR` in a directory others may write and that is not sticky: another
/// user could replace the functions' directory, and with it the programs the runners start.
/// The demo refuses it, saying why, and starts nothing.
#[test]
fn a_functions_dir_others_can_replace_is_refused() -> anyhow::Result<()> {
    let mut demo = Demo::start_with(|root| {
        let dir = root.join("open");
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        Ok(dir.join("functions"))
    })?;
    let status = demo.wait_exit(START)?;
    ensure!(
        status.code() == Some(1) && demo.screen().contains("others may write it"),
        "the demo ran functions from a directory others can replace: {status}\n{}",
        demo.report()
    );
    ensure!(demo.processes().is_empty(), "{:#?}", demo.processes());
    Ok(())
}

/// `FN_DEMO_FUNCTIONS_DIR` under a directory closed to other users (a home directory):
/// root's runners run each function as a user of its own, who could not reach it, and would
/// not start; the demo refuses it, saying why. Run by another user, whose functions run as
/// that user, the demo starts.
#[test]
fn a_functions_dir_root_s_function_users_cannot_reach_is_refused_as_root() -> anyhow::Result<()> {
    let mut demo = Demo::start_with(|root| {
        let dir = root.join("home");
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(dir.join("functions"))
    })?;
    if nix::unistd::geteuid().is_root() {
        let status = demo.wait_exit(START)?;
        ensure!(
            status.code() == Some(1) && demo.screen().contains("closed to other users"),
            "the demo did not refuse functions its function users cannot reach: {status}\n{}",
            demo.report()
        );
    } else {
        demo.read_until(BANNER_END, START)?;
        demo.ctrl_c()?;
        let status = demo.wait_exit(STOP)?;
        ensure!(status.code() == Some(130), "{status}\n{}", demo.report());
    }
    ensure!(demo.processes().is_empty(), "{:#?}", demo.processes());
    Ok(())
}

/// Makes every call of the banner at once and checks each against its promise.
fn check_promises(calls: &[String]) -> anyhow::Result<()> {
    let mut matched = BTreeSet::new();
    let mut checks = Vec::new();
    for call in calls {
        let found: Vec<(usize, &Promise)> = PROMISES
            .iter()
            .enumerate()
            .filter(|(_, p)| call.contains(p.call))
            .collect();
        let [(i, promise)] = found[..] else {
            bail!("the banner's call `{call}` is not one this test knows the answer of: add it");
        };
        ensure!(matched.insert(i), "the banner prints `{call}` twice");
        if let Some((_, comment)) = call.split_once('#') {
            let said: Option<u16> = comment
                .trim()
                .split(':')
                .next()
                .and_then(|s| s.parse().ok());
            ensure!(
                said.is_none() || said == promise.status,
                "the banner says `{call}`; this test expects {:?}",
                promise.status
            );
        }
        checks.push((call.as_str(), promise));
    }
    for (i, promise) in PROMISES.iter().enumerate() {
        ensure!(
            matched.contains(&i),
            "the banner no longer prints a call to {}",
            promise.call
        );
    }
    // One after another, as a user tries them: all at once, the calls of the banner's last
    // line and the 9 s sleep competed for the runners while the npm scaled up, and a call
    // could get 503 (no room within its placement wait) on a loaded machine.
    for (call, promise) in &checks {
        let output = curl(call)?;
        let (status, body) = match promise.status {
            Some(_) => {
                let (status, body) = reply(&output)?;
                (Some(status), body)
            }
            None => (None, String::from_utf8_lossy(&output.stdout).into_owned()),
        };
        ensure!(
            status == promise.status
                && (promise.body.is_empty() || body.matches(promise.body).count() == promise.times),
            "`{call}` answered {status:?} {body:?}; the banner promises {:?} with {:?} \
             ({} times); curl said: {}",
            promise.status,
            promise.body,
            promise.times,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Runs `line`, a shell line of the banner's, with every curl bounded in time and telling
/// of its errors.
fn curl(line: &str) -> anyhow::Result<Output> {
    let line = line.replace("curl ", &format!("curl -sS --max-time {CALL_BOUND} "));
    Command::new("bash")
        .args(["-c", &line])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{line}` (needs bash and curl)"))
}

/// The status and body of a `curl -i` answer.
fn reply(output: &Output) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(&output.stdout);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "no HTTP answer: {text} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    Ok((status, body.to_owned()))
}

/// One run of the demo script. On drop every process of it still there is killed, and its
/// runners' socket directories are removed, so that a failing test leaves nothing behind.
struct Demo {
    root: tempfile::TempDir,
    /// `setsid`, which became the script (it execs without forking when it is not a group
    /// leader, as a child of this test is not): its pid is the script's session and group.
    script: Child,
    /// The pseudo-terminal's master side, non-blocking. Closing it hangs the terminal up.
    terminal: Option<File>,
    /// Everything the terminal showed so far.
    screen: Vec<u8>,
    lb_port: u16,
    /// Held while the demo runs (released after its clean-up, as fields drop after `drop`).
    _alone: std::sync::MutexGuard<'static, ()>,
}

/// One demo at a time: each is a whole dataplane (an npm spawning runners as its calls ask,
/// an lb-agent on two shards, their functions), and several at once on a loaded machine
/// left calls waiting past their placement time (503) while their runners came up.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Demo {
    /// The demo with its functions in a directory of the test's (`FN_DEMO_FUNCTIONS_DIR`).
    fn start() -> anyhow::Result<Demo> {
        Self::start_with(|root| Ok(root.join("functions")))
    }

    /// The demo with `FN_DEMO_FUNCTIONS_DIR` where `functions` says, given the test's
    /// directory (open to the function users, as /tmp is).
    fn start_with(
        functions: impl FnOnce(&Path) -> anyhow::Result<PathBuf>,
    ) -> anyhow::Result<Demo> {
        // A demo test that failed still released it: what it guards is the machine's load.
        let alone = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let root = tempfile::tempdir()?;
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
        let functions = functions(root.path())?;
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin)?;
        for name in [
            "lb-agent", "npm", "fn-certs", "fn-hello", "fn-echo", "fn-sleep", "fn-crash",
        ] {
            std::os::unix::fs::symlink(workspace_bin(name), bin.join(name))?;
        }
        // The runners the npm spawns keep their table of function uids here, not in /run.
        let runner_dir = root.path().join("runner");
        std::fs::create_dir(&runner_dir)?;
        let runner = runner_with_uid_table(&runner_dir, &workspace_bin("pure-runner"))?;
        std::os::unix::fs::symlink(runner, bin.join("pure-runner"))?;

        let (terminal, slave) = pseudo_terminal()?;
        let lb_port = free_port()?;
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let catalog = root.path().join("functions.toml");
        let mut functions_toml =
            std::fs::read_to_string(workspace.join("deploy/catalog/functions.toml"))?;
        functions_toml.push_str(LINGER);
        std::fs::write(&catalog, functions_toml)?;
        let mut command = Command::new("env");
        // INT and HUP as a terminal's shell leaves them, whatever this test run inherited
        // (a background job of a script ignores SIGINT, and bash cannot trap a signal
        // ignored at its start).
        command
            .args(["--default-signal=INT,HUP,TERM", "setsid", "--ctty"])
            .args(["bash", "deploy/demo.sh"])
            .current_dir(workspace)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("BIN", &bin)
            .env("DEMO_DIR", root.path().join("demo"))
            .env("FN_DEMO_FUNCTIONS_DIR", functions)
            .env("FN_DEMO_FUNCTIONS_FILE", &catalog)
            .env("FN_PORT", lb_port.to_string())
            .env("FN_NPM_PORT", free_port()?.to_string())
            .stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        let script = command
            .spawn()
            .context("running env (coreutils 8.31+) and setsid (util-linux)")?;
        // Our copies of the terminal's side: the script holds its own.
        drop(command);
        let demo = Demo {
            root,
            script,
            terminal: Some(terminal),
            screen: Vec::new(),
            lb_port,
            _alone: alone,
        };
        // `env` execs `setsid`, which makes the session and execs the script.
        let start = Instant::now();
        while session_of(demo.pid())? != demo.pid() {
            ensure!(
                start.elapsed() < Duration::from_secs(5),
                "the script is not the leader of a session of its own: did setsid fork?"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(demo)
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.script.id()).unwrap_or(i32::MAX)
    }

    /// Reads what the terminal shows until it shows `text`.
    fn read_until(&mut self, text: &str, bound: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            self.read_terminal();
            if self.screen().contains(text) {
                return Ok(());
            }
            if let Some(status) = self.script.try_wait()? {
                self.read_terminal();
                bail!(
                    "the demo exited ({status}) before showing {text:?}\n{}",
                    self.report()
                );
            }
            if start.elapsed() > bound {
                bail!(
                    "the demo did not show {text:?} in {bound:?}\n{}",
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes in what the terminal has to show now.
    fn read_terminal(&mut self) {
        let Some(terminal) = self.terminal.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        // At most 1 MiB a time: the script writes a few lines.
        for _ in 0..256 {
            match terminal.read(&mut buf) {
                Ok(n) if n > 0 => self.screen.extend_from_slice(&buf[..n]),
                // Ok(0), WouldBlock: nothing more now; EIO: the other side is all closed.
                Ok(_) | Err(_) => return,
            }
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen).replace('\r', "")
    }

    /// The shell lines of the banner's calls.
    fn banner_calls(&self) -> anyhow::Result<Vec<String>> {
        let screen = self.screen();
        let banner = screen
            .split_once(BANNER)
            .and_then(|(_, rest)| rest.split_once(BANNER_END))
            .map(|(banner, _)| banner)
            .with_context(|| format!("no banner in:\n{screen}"))?;
        Ok(banner
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("curl ") || l.starts_with("for "))
            .map(str::to_owned)
            .collect())
    }

    /// The terminal's Ctrl-C: the line discipline sends SIGINT to the foreground process
    /// group, the script's and its daemons'.
    fn ctrl_c(&mut self) -> anyhow::Result<()> {
        self.terminal
            .as_mut()
            .context("the terminal is closed")?
            .write_all(&[0x03])
            .context("typing Ctrl-C")
    }

    /// Closes the terminal: the kernel hangs it up, sending SIGHUP to the session's leader.
    fn hang_up(&mut self) {
        self.read_terminal();
        self.terminal = None;
    }

    fn wait_exit(&mut self, bound: Duration) -> anyhow::Result<ExitStatus> {
        let start = Instant::now();
        loop {
            self.read_terminal();
            if let Some(status) = self.script.try_wait()? {
                self.read_terminal();
                return Ok(status);
            }
            if start.elapsed() > bound {
                bail!("the demo did not exit in {bound:?}\n{}", self.report());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The test's outcome: `failures`, and whatever the script left behind once it exited,
    /// all told together with what the demo printed and logged.
    fn verdict(&self, mut failures: Vec<String>) -> anyhow::Result<()> {
        failures.extend(self.left_behind());
        ensure!(
            failures.is_empty(),
            "{}\n{}",
            failures.join("\n"),
            self.report()
        );
        Ok(())
    }

    /// What the script left behind, once it exited: its processes (after [`GONE`]), the
    /// socket directories of its runners.
    fn left_behind(&self) -> Vec<String> {
        let mut left = Vec::new();
        let start = Instant::now();
        let mut processes = self.processes();
        while !processes.is_empty() && start.elapsed() < GONE {
            std::thread::sleep(Duration::from_millis(20));
            processes = self.processes();
        }
        if !processes.is_empty() {
            left.push(format!(
                "left running {GONE:?} after the demo exited: {processes:#?}"
            ));
        }
        let runners = self.runners();
        if runners.is_empty() {
            left.push("the npm's log names no runner: the test stopped none".into());
        }
        let sockets: Vec<PathBuf> = runners
            .iter()
            .map(|id| socket_dir(id))
            .filter(|d| d.exists())
            .collect();
        if !sockets.is_empty() {
            left.push(format!("runners' socket directories left: {sockets:?}"));
        }
        left
    }

    /// This run's live processes (`pid command line`): in the script's session, or naming
    /// the test's directory in their command line or environment (runners and function
    /// instances may have sessions of their own).
    fn processes(&self) -> Vec<String> {
        let root = self.root.path().to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| u32::try_from(*pid).ok() != Some(std::process::id()))
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (state, session) = state_and_session(&stat)?;
                if state == "Z" || state == "X" {
                    return None;
                }
                let read = |what: &str| {
                    let raw = std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
                    String::from_utf8_lossy(&raw).replace('\0', " ")
                };
                let cmdline = read("cmdline");
                (session == self.pid()
                    || cmdline.contains(&root)
                    || read("environ").contains(&root))
                .then(|| format!("{pid} {cmdline}"))
            })
            .collect()
    }

    /// The ids of the runners the npm spawned, from its log.
    fn runners(&self) -> BTreeSet<String> {
        self.log("npm")
            .split("runner=")
            .skip(1)
            .filter_map(|rest| {
                let id = rest.split(|c: char| c.is_whitespace()).next()?;
                id.starts_with("r-").then(|| id.to_owned())
            })
            .collect()
    }

    fn log(&self, daemon: &str) -> String {
        let path = self
            .root
            .path()
            .join("demo/logs")
            .join(format!("{daemon}.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The terminal and the daemons' last log lines, for a failure's message.
    fn report(&self) -> String {
        let tail = |daemon: &str| {
            let log = self.log(daemon);
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!(
            "terminal:\n{}\nnpm.log:\n{}\nlb-agent.log:\n{}",
            self.screen(),
            tail("npm"),
            tail("lb-agent")
        )
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.script.try_wait().ok().flatten().is_none() {
            // Ends the script and its group (a test that failed with it running).
            kill(Pid::from_raw(-self.pid()), Signal::SIGKILL).ok();
        }
        for process in self.processes() {
            if let Some(pid) = process.split(' ').next().and_then(|p| p.parse().ok()) {
                // Gone already when this fails.
                kill(Pid::from_raw(pid), Signal::SIGKILL).ok();
            }
        }
        self.script.wait().ok();
        for id in self.runners() {
            // Removed by the runner, normally.
            std::fs::remove_dir_all(socket_dir(&id)).ok();
        }
    }
}

/// A new pseudo-terminal: its master side (non-blocking) and its other side. Both are
/// close-on-exec from their opening on (`openpty` leaves them open in every process any test
/// of this binary starts meanwhile, and the terminal would not hang up when the test closes
/// its master).
///
/// # Errors
/// When the system has no pseudo-terminal to give.
fn pseudo_terminal() -> anyhow::Result<(File, File)> {
    let master =
        posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).context("posix_openpt")?;
    grantpt(&master).context("grantpt")?;
    unlockpt(&master).context("unlockpt")?;
    let name = ptsname_r(&master).context("ptsname")?;
    // std opens with O_CLOEXEC; this process must not take it as its terminal.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(OFlag::O_NOCTTY.bits())
        .open(&name)
        .with_context(|| format!("opening {name}"))?;
    let master = File::from(std::os::fd::OwnedFd::from(master));
    fcntl(&master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).context("O_NONBLOCK")?;
    Ok((master, slave))
}

/// A runner's socket directory (the npm runs with no `TMPDIR`).
fn socket_dir(id: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/fn-{id}"))
}

/// The state and session of a `/proc/<pid>/stat` line.
fn state_and_session(stat: &str) -> Option<(&str, i32)> {
    // After the command's name in parentheses: state, ppid, pgrp, session.
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let session = fields.nth(2)?.parse().ok()?;
    Some((state, session))
}

/// The session of process `pid`.
fn session_of(pid: i32) -> anyhow::Result<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    state_and_session(&stat)
        .map(|(_, session)| session)
        .context("unreadable /proc stat")
}
