//! fn-isolate: starts one function instance in namespaces of its own, for pure-runner.
//!
//! The runner (root) starts `fn-isolate [--net-none] --uid U --gid G [--keep DIR]... --
//! PROGRAM ARGS...` in place of the program, with the function's environment, working
//! directory, output pipes and memory cgroup already set. Not a user-facing tool.
//!
//! 1. **Outside** (the runner's child): unshares a PID, a mount and an IPC namespace, and a network
//!    namespace with `--net-none` (only loopback, down: the function reaches nothing but its
//!    own unix socket). Then starts itself again as the first process of the new PID
//!    namespace, and exits with its status. Its stdin to the inside is a *lifeline*: when the
//!    outside process dies (the runner killed the instance), the inside sees end-of-file.
//! 2. **Inside** (PID 1 of the namespace, still root): makes every mount private, mounts a
//!    `/proc` of the namespace (the function sees only its own processes), and a fresh tmpfs
//!    on `/tmp` with the `--keep` directories (the instance directory with its socket) bound
//!    back in, and fresh ones on `/var/tmp`, `/dev/shm` and `/run/lock` and the IPC
//!    namespace's own `/dev/mqueue` (kept directories under them bound back too: nothing
//!    there is shared with other tenants or outlives the instance). It enters its working
//!    directory again in the new tree. It leaves the runner's session for one of its own,
//!    so the program has no controlling terminal (a runner started from a terminal would
//!    otherwise give it the operator's). Then it starts the program as `U`:`G` (required,
//!    never 0) with no supplementary groups, reaps
//!    every process the namespace leaves behind, and exits with the program's status. When
//!    it exits, the kernel kills whatever is left in the namespace; when the lifeline or the
//!    outside process goes, it exits.
//!
//! The function's config comes in variables named `FN_ISOLATE_CONFIG_<name>` (the runner's
//! `ISOLATED_CONFIG_PREFIX`): this process and the shell before it run as root, and must not
//! read a tenant's `LD_PRELOAD` or the like. Only the program gets them, under their own
//! names; a variable the runner sets itself (the FDK contract's) wins over a config entry of
//! the same name.
//!
//! `fn-isolate --probe [--net-none]` exits 0 when this process may create the namespaces
//! (root or `CAP_SYS_ADMIN`) and make an instance's mounts in them (a container's AppArmor
//! profile or masked `/proc` paths refuse those where the namespaces alone are allowed), so
//! the runner can say at start whether instances get them.

use std::ffi::OsString;
use std::io::Read as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};

/// Exit status when isolation itself fails (as `env` and `nice` use for their own errors).
const SETUP_FAILED: u8 = 125;
/// The flag of the inside stage (argument 1).
const INSIDE: &str = "--inside";
/// The prefix the runner gives the function's config (`ISOLATED_CONFIG_PREFIX`).
const CONFIG_PREFIX: &str = "FN_ISOLATE_CONFIG_";

/// The program's environment from this process's: the variables the runner set, and the
/// config under its own names where the runner set no variable of that name.
fn program_env(vars: Vec<(OsString, OsString)>) -> Vec<(OsString, OsString)> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut plain = Vec::with_capacity(vars.len());
    let mut config = Vec::new();
    for (name, value) in vars {
        match name.as_bytes().strip_prefix(CONFIG_PREFIX.as_bytes()) {
            Some(stripped) => {
                config.push((std::ffi::OsStr::from_bytes(stripped).to_owned(), value))
            }
            None => plain.push((name, value)),
        }
    }
    config.retain(|(name, _)| !name.is_empty() && !plain.iter().any(|(set, _)| set == name));
    plain.extend(config);
    plain
}

#[derive(Debug, Default)]
struct Options {
    probe: bool,
    net_none: bool,
    uid: Option<u32>,
    gid: Option<u32>,
    keep: Vec<PathBuf>,
    program: Option<OsString>,
    args: Vec<OsString>,
}

fn parse(mut argv: impl Iterator<Item = OsString>) -> Result<Options, String> {
    let mut options = Options::default();
    while let Some(arg) = argv.next() {
        let flag = arg.to_string_lossy().into_owned();
        let mut value = |name: &str| argv.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--probe" => options.probe = true,
            "--net-none" => options.net_none = true,
            "--uid" => options.uid = Some(number(&value("--uid")?, "--uid")?),
            "--gid" => options.gid = Some(number(&value("--gid")?, "--gid")?),
            "--keep" => options.keep.push(PathBuf::from(value("--keep")?)),
            "--" => {
                options.program = argv.next();
                options.args = argv.collect();
                break;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !options.probe {
        if options.program.is_none() {
            return Err("no program after --".to_owned());
        }
        // Root in the namespaces could undo them (unmount the private /tmp, say).
        for (name, id) in [("--uid", options.uid), ("--gid", options.gid)] {
            match id {
                None => return Err(format!("{name} is required: a function never runs as root")),
                Some(0) => return Err(format!("{name} 0: a function never runs as root")),
                Some(_) => {}
            }
        }
    }
    Ok(options)
}

fn number(value: &OsString, name: &str) -> Result<u32, String> {
    value
        .to_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{name}: not a number: {value:?}"))
}

fn main() -> ExitCode {
    let mut argv = std::env::args_os().skip(1).peekable();
    let inside = argv.peek().is_some_and(|a| a == INSIDE);
    if inside {
        argv.next();
    }
    let options = match parse(argv) {
        Ok(options) => options,
        Err(e) => return fail(&e),
    };
    if inside {
        run_inside(&options)
    } else {
        run_outside(&options)
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("fn-isolate: {message}");
    ExitCode::from(SETUP_FAILED)
}

fn namespaces(options: &Options) -> CloneFlags {
    // IPC: System V objects and POSIX message queues are the instance's own, gone with it.
    let mut flags = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC;
    if options.net_none {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    flags
}

fn run_outside(options: &Options) -> ExitCode {
    if let Err(e) = unshare(namespaces(options)) {
        return fail(&format!(
            "cannot create namespaces ({e}): the runner needs root or CAP_SYS_ADMIN"
        ));
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return fail(&format!("cannot find its own program: {e}")),
    };
    // The first process started now is PID 1 of the new namespace.
    let mut inside = match Command::new(exe)
        .arg(INSIDE)
        .args(std::env::args_os().skip(1))
        .stdin(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return fail(&format!("cannot start the namespace's first process: {e}")),
    };
    // Held until this process ends, by exit or by SIGKILL: then the inside sees EOF.
    let _lifeline = inside.stdin.take();
    match inside.wait() {
        Ok(status) => exit_code(status.code(), status.signal()),
        Err(e) => fail(&format!("waiting for the namespace: {e}")),
    }
}

/// The shell's convention: the exit code, or 128 + the signal that ended the process.
fn exit_code(code: Option<i32>, signal: Option<i32>) -> ExitCode {
    let value = code.or(signal.map(|s| 128 + s)).unwrap_or(1);
    ExitCode::from(u8::try_from(value).unwrap_or(1))
}

fn run_inside(options: &Options) -> ExitCode {
    // The outside process gone (killed with the instance) means this namespace goes too.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return fail(&format!("cannot tie the namespace to its parent: {e}"));
    }
    std::thread::spawn(|| {
        let mut byte = [0u8; 1];
        loop {
            match std::io::stdin().read(&mut byte) {
                Ok(0) | Err(_) => std::process::exit(137),
                Ok(_) => {}
            }
        }
    });
    // A session of its own, with no controlling terminal: the program and all it forks
    // cannot open `/dev/tty` to reach the terminal the runner was started from (read and
    // write the operator's, or push keystrokes into their shell with `TIOCSTI`). Never a
    // process group leader (the outside process started it in its own group), so this
    // cannot fail with `EPERM`; it leaves the outside's group, which the runner kills, but
    // dies with the outside all the same (its lifeline, `PR_SET_PDEATHSIG`), and the
    // namespace with it.
    if let Err(e) = nix::unistd::setsid() {
        return fail(&format!("cannot start a session of its own: {e}"));
    }
    if let Err(e) = private_mounts(options) {
        return fail(&e);
    }
    // A probe tries what every instance does, the mounts too (a container's AppArmor profile
    // or masked /proc paths refuse them where the namespaces alone are allowed), and no more.
    if options.probe {
        return ExitCode::SUCCESS;
    }
    let Some(program) = &options.program else {
        return fail("no program after --");
    };
    let mut command = Command::new(program);
    command
        .args(&options.args)
        .stdin(Stdio::null())
        .env_clear()
        .envs(program_env(std::env::vars_os().collect()));
    // Both set (checked when the options were read); as root, std also drops every
    // supplementary group.
    if let (Some(uid), Some(gid)) = (options.uid, options.gid) {
        command.uid(uid).gid(gid);
    }
    let function = match command.spawn() {
        Ok(child) => child,
        Err(e) => return fail(&format!("cannot start {}: {e}", program.to_string_lossy())),
    };
    let function_pid = nix::unistd::Pid::from_raw(i32::try_from(function.id()).unwrap_or(-1));
    // PID 1 reaps every orphan of the namespace until the function itself ends.
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == function_pid => {
                return exit_code(Some(code), None);
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == function_pid => {
                return exit_code(None, Some(signal as i32));
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return fail(&format!("waiting for the function: {e}")),
        }
    }
}

/// The places every process may write, each given a file system of the instance's own:
/// without, they were shared by every tenant (a channel between them) and outlived the
/// instance, holding memory no limit counted once it was gone. `/tmp` always; the others
/// where the host has them. `/dev/mqueue` gets the IPC namespace's own queues.
const PRIVATE_PLACES: [(&str, &str, Option<&str>); 5] = [
    ("/tmp", "tmpfs", Some("mode=1777")),
    ("/var/tmp", "tmpfs", Some("mode=1777")),
    ("/dev/shm", "tmpfs", Some("mode=1777")),
    ("/run/lock", "tmpfs", Some("mode=1777")),
    ("/dev/mqueue", "mqueue", None),
];

/// Private mounts: a `/proc` of this namespace, and a fresh file system on each of
/// [`PRIVATE_PLACES`] holding only the kept directories under it; then the working
/// directory entered again, in the new tree (the one inherited was the host's, and its
/// `..` led out of the private `/tmp`).
fn private_mounts(options: &Options) -> Result<(), String> {
    let none: Option<&str> = None;
    let cwd =
        std::env::current_dir().map_err(|e| format!("cannot read the working directory: {e}"))?;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("cannot make the mounts private: {e}"))?;
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), hardened, none)
        .map_err(|e| format!("cannot mount /proc for the namespace: {e}"))?;
    let places: Vec<_> = PRIVATE_PLACES
        .into_iter()
        .filter(|(path, ..)| *path == "/tmp" || std::path::Path::new(path).is_dir())
        .collect();
    // Kept directories under those places are opened before the new file systems hide
    // them, then bound back. A directory inside another kept one comes with it.
    let hidden: Vec<&PathBuf> = options
        .keep
        .iter()
        .filter(|d| places.iter().any(|(path, ..)| d.starts_with(path)))
        .collect();
    let mut kept = Vec::new();
    for dir in hidden
        .iter()
        .filter(|d| !hidden.iter().any(|o| o != *d && d.starts_with(o)))
    {
        let fd = open(
            dir.as_path(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
        kept.push((dir, fd));
    }
    for &(path, fstype, data) in &places {
        let flags = match fstype {
            "mqueue" => hardened,
            _ => MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        };
        mount(Some(fstype), path, Some(fstype), flags, data)
            .map_err(|e| format!("cannot mount a private {path}: {e}"))?;
    }
    for (dir, fd) in kept {
        // Traversable, not listable, as the runner's socket root: an instance finds its own
        // directory and cannot tell what else the runner keeps.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o711)
            .create(dir)
            .map_err(|e| {
                format!(
                    "cannot recreate {} in its private place: {e}",
                    dir.display()
                )
            })?;
        // The umask narrowed that mode (027 made them 0710, and the function could not reach
        // its own directory): set it on each directory made in the fresh mount.
        let place = places
            .iter()
            .map(|(path, ..)| Path::new(path))
            .find(|path| dir.starts_with(path));
        for made in dir
            .ancestors()
            .take_while(|a| place.is_some_and(|place| *a != place && a.starts_with(place)))
        {
            std::fs::set_permissions(made, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| format!("cannot open {} to the function: {e}", made.display()))?;
        }
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        mount(
            Some(source.as_str()),
            dir.as_path(),
            none,
            MsFlags::MS_BIND,
            none,
        )
        .map_err(|e| {
            format!(
                "cannot bind {} back into its private place: {e}",
                dir.display()
            )
        })?;
    }
    if options.probe {
        // The runner's own working directory may be hidden (under /tmp, say); an
        // instance's, its functions directory, is kept.
        return Ok(());
    }
    std::env::set_current_dir(&cwd).map_err(|e| {
        format!(
            "cannot enter the working directory {} in the namespace (keep it with --keep): {e}",
            cwd.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> impl Iterator<Item = OsString> {
        list.iter()
            .map(OsString::from)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn options_are_read_up_to_the_program_and_its_arguments_kept_whole() {
        let options = parse(args(&[
            "--uid",
            "100001",
            "--gid",
            "100002",
            "--keep",
            "/tmp/a",
            "--keep",
            "/srv/f",
            "--net-none",
            "--",
            "/srv/f/fn",
            "--uid",
            "x",
        ]))
        .expect("valid");
        assert_eq!(options.uid, Some(100_001));
        assert_eq!(options.gid, Some(100_002));
        assert_eq!(
            options.keep,
            [PathBuf::from("/tmp/a"), PathBuf::from("/srv/f")]
        );
        assert!(options.net_none && !options.probe);
        assert_eq!(options.program, Some(OsString::from("/srv/f/fn")));
        assert_eq!(options.args, [OsString::from("--uid"), OsString::from("x")]);
    }

    #[test]
    fn the_config_gets_its_names_back_and_the_runners_variables_win() {
        let vars = [
            ("PATH", "/usr/bin"),
            ("FN_ISOLATE_CONFIG_LD_PRELOAD", "x.so"),
            ("FN_ISOLATE_CONFIG_PATH", "/evil"),
            ("FN_ISOLATE_CONFIG_FN_ISOLATE_CONFIG_A", "b"),
            ("FN_ISOLATE_CONFIG_", "empty name"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .to_vec();
        let mut env = program_env(vars);
        env.sort();
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.to_string_lossy().into(), v.to_string_lossy().into()))
            .collect();
        assert_eq!(
            env,
            [
                ("FN_ISOLATE_CONFIG_A".into(), "b".into()),
                ("LD_PRELOAD".into(), "x.so".into()),
                ("PATH".into(), "/usr/bin".into()),
            ]
        );
    }

    #[test]
    fn bad_arguments_are_named() {
        let err = parse(args(&["--uid", "root", "--", "p"])).expect_err("not a number");
        assert!(err.contains("--uid") && err.contains("root"), "{err}");
        let err = parse(args(&["--bogus"])).expect_err("unknown");
        assert!(err.contains("--bogus"), "{err}");
        let err = parse(args(&["--uid", "1"])).expect_err("no program");
        assert!(err.contains("no program"), "{err}");
        assert!(
            parse(args(&["--probe"])).is_ok(),
            "a probe needs no program"
        );
        let err = parse(args(&["--keep"])).expect_err("no value");
        assert!(err.contains("--keep needs a value"), "{err}");
    }

    /// Root in the namespaces could undo them: a program runs as a user given, never 0.
    #[test]
    fn a_program_never_runs_as_root() {
        let err = parse(args(&["--gid", "5", "--", "p"])).expect_err("no uid");
        assert!(err.contains("--uid is required"), "{err}");
        let err = parse(args(&["--uid", "5", "--", "p"])).expect_err("no gid");
        assert!(err.contains("--gid is required"), "{err}");
        let err = parse(args(&["--uid", "0", "--gid", "5", "--", "p"])).expect_err("root");
        assert!(err.contains("--uid 0"), "{err}");
        let err = parse(args(&["--uid", "5", "--gid", "0", "--", "p"])).expect_err("root");
        assert!(err.contains("--gid 0"), "{err}");
        assert!(parse(args(&["--uid", "5", "--gid", "5", "--", "p"])).is_ok());
    }
}
