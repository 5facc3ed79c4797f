//! `fn-hostile`: a function written to attack another function's running instance, for the
//! isolation tests (`system-tests/tests/isolation.rs`). It is never part of an image.
//!
//! The request body names the target, one `key=value` per line: `pid` (the victim's process),
//! `dir` (its instance directory), `socket` (its listener), `key` (a file the runner keeps
//! from functions), `root` (the runner's socket root), `marker` (a path under `/tmp` to
//! leave a file at) and `grpc` (the runner's gRPC `host:port`). The answer has one line per
//! attempt, `<attempt>: denied (<error>)` or `<attempt>: ALLOWED`.
//!
//! It also tries what a function in a container must not be able to do: run as root, write
//! to the root file system, and see a network interface other than loopback. With
//! `allocate_mb=N` it first allocates and touches N MiB, to test memory limits (it only
//! answers when it survives). With `fill_mb=N` it only writes N MiB into `fill` in its own
//! instance directory (beside its socket, from `FN_LISTENER`), and answers how much it wrote
//! and, if a write failed, the error (what bounds the directory: `No space left on
//! device`). With `session=1` it only answers `pid P sid S`, its own process and session ids
//! as its `/proc/self/stat` gives them (0: a session led from outside its PID namespace),
//! and `tty: ` what opening `/dev/tty`, its controlling terminal, gave.

use std::collections::HashMap;
use std::process::ExitCode;

use fn_fdk::{Body, Context, Response};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn main() -> ExitCode {
    fn_fdk::run(|_ctx: Context, body: Body| async move {
        let text = body.bytes().await?;
        let target: HashMap<String, String> = String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let get = |key: &str| target.get(key).cloned().unwrap_or_default();
        if let Ok(mb) = get("allocate_mb").parse::<usize>() {
            let hog = vec![1_u8; mb * 1024 * 1024];
            // Read it back so that the allocation is neither elided nor left untouched.
            let sum: usize = hog.iter().step_by(4096).map(|b| usize::from(*b)).sum();
            return Ok(Response::new(format!("allocated {mb} MiB ({sum} pages)\n")));
        }
        if let Ok(mb) = get("fill_mb").parse::<usize>() {
            return Ok(Response::new(fill_instance_dir(mb)));
        }
        if get("session") == "1" {
            return Ok(Response::new(session()));
        }
        let pid = Pid::from_raw(get("pid").parse().unwrap_or(0));
        let mut report = String::new();
        let mut row = |attempt: &str, outcome: Result<(), String>| {
            let line = match outcome {
                Ok(()) => format!("{attempt}: ALLOWED\n"),
                Err(e) => format!("{attempt}: denied ({e})\n"),
            };
            report.push_str(&line);
        };
        row(
            "read its /proc/PID/environ",
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(drop)
                .map_err(|e| e.to_string()),
        );
        row(
            "send it SIGTERM",
            kill(pid, Signal::SIGTERM).map_err(|e| e.to_string()),
        );
        row(
            "ptrace-attach to it",
            nix::sys::ptrace::attach(pid)
                .map(|()| {
                    // Let it go at once: the row already says what matters.
                    let _detached = nix::sys::ptrace::detach(pid, None);
                })
                .map_err(|e| e.to_string()),
        );
        row(
            "connect to its socket",
            std::os::unix::net::UnixStream::connect(get("socket"))
                .map(drop)
                .map_err(|e| e.to_string()),
        );
        row(
            "write into its private directory",
            std::fs::write(format!("{}/pwned", get("dir")), b"x").map_err(|e| e.to_string()),
        );
        row(
            "read the runner's key",
            std::fs::read(get("key"))
                .map(drop)
                .map_err(|e| e.to_string()),
        );
        row(
            "list the runner's socket root",
            std::fs::read_dir(get("root"))
                .map(drop)
                .map_err(|e| e.to_string()),
        );
        row("see the runner's processes", {
            let pids = std::fs::read_dir("/proc")
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                        .count()
                })
                .unwrap_or(0);
            // Its own namespace holds its first process and this function.
            if pids > 2 {
                Ok(())
            } else {
                Err(format!("sees {pids} processes"))
            }
        });
        row(
            "leave a file in /tmp",
            std::fs::write(get("marker"), b"x").map_err(|e| e.to_string()),
        );
        row(
            "connect to the runner's gRPC port",
            get("grpc")
                .parse::<std::net::SocketAddr>()
                .map_err(|e| e.to_string())
                .and_then(|address| {
                    std::net::TcpStream::connect_timeout(
                        &address,
                        std::time::Duration::from_secs(2),
                    )
                    .map(drop)
                    .map_err(|e| e.to_string())
                }),
        );
        row(
            "run as root",
            if nix::unistd::geteuid().is_root() {
                Ok(())
            } else {
                Err(format!("uid {}", nix::unistd::geteuid()))
            },
        );
        // Into a directory anyone may write where the image has one (the test images do),
        // so that only a read-only root file system can refuse it; else into `/`.
        let writable = std::path::Path::new("/writable");
        let planted = if writable.is_dir() {
            writable.join("fn-hostile-was-here")
        } else {
            std::path::PathBuf::from("/fn-hostile-was-here")
        };
        row(
            "write to the root file system",
            std::fs::write(planted, b"x").map_err(|e| e.to_string()),
        );
        row("see a network interface other than loopback", {
            let interfaces: Vec<String> = std::fs::read_dir("/sys/class/net")
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|name| name != "lo")
                        .collect()
                })
                .unwrap_or_default();
            if interfaces.is_empty() {
                Err("only lo".to_owned())
            } else {
                Ok(())
            }
        });
        Ok(Response::new(report))
    })
}

/// Writes up to `mb` MiB, 1 MiB at a time, into `fill` in the directory of this instance's
/// socket, and says how far it got: `wrote N MiB into DIR` and, when a write failed,
/// `, then: ERROR`. The file is left there for the test to find.
fn fill_instance_dir(mb: usize) -> String {
    use std::io::Write as _;
    let listener = std::env::var("FN_LISTENER").unwrap_or_default();
    let Some(dir) = std::path::Path::new(listener.trim_start_matches("unix:")).parent() else {
        return format!("no instance directory in FN_LISTENER={listener:?}\n");
    };
    let chunk = vec![0x5a_u8; 1024 * 1024];
    let mut file = match std::fs::File::create(dir.join("fill")) {
        Ok(file) => file,
        Err(e) => return format!("wrote 0 MiB into {}, then: {e}\n", dir.display()),
    };
    for written in 0..mb {
        if let Err(e) = file.write_all(&chunk) {
            return format!("wrote {written} MiB into {}, then: {e}\n", dir.display());
        }
    }
    format!("wrote {mb} MiB into {}\n", dir.display())
}

/// `pid P sid S tty: OUTCOME`: fields 1 and 6 of `/proc/self/stat` (after the command name,
/// which may hold spaces), and whether `/dev/tty` opened (`opened`) or the error.
fn session() -> String {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let pid = stat.split(' ').next().unwrap_or("?");
    // After `(comm)`: state, ppid, pgrp, session.
    let sid = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(3))
        .unwrap_or("?");
    let tty = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
    {
        Ok(_) => "opened".to_owned(),
        Err(e) => e.to_string(),
    };
    format!("pid {pid} sid {sid} tty: {tty}\n")
}
