//! Whether the runner has a controlling terminal (`fn_runner::terminal`), which the
//! runner warns of at start where its instances get no namespaces.
//!
//! Each case runs this test binary again in a new session (util-linux `setsid`): with a
//! pseudo-terminal of its own as its controlling terminal (`--ctty`), or with none. The
//! cases are ignored in a plain run (they need that session), and do nothing without it.

use std::process::{Command, Stdio};

use fn_runner::terminal::controlling_terminal;

/// Set in the test binary run again: the case to check in it.
const CASE: &str = "FN_TEST_TERMINAL_CASE";

/// Runs the test `case` of this file in this binary again, in a session of its own, with
/// a new pseudo-terminal as its controlling terminal when `with_terminal`.
fn run_in_a_session(case: &str, with_terminal: bool) {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut command = Command::new("setsid");
    if with_terminal {
        command.arg("--ctty");
    }
    let output = command
        .arg("--wait")
        .arg(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            case,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE, case)
        .stdin(Stdio::from(pty.slave))
        .output()
        .expect("run setsid (util-linux)");
    assert!(
        output.status.success(),
        "{case}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Not a run of no test at all (a case's name mistyped).
    assert!(
        String::from_utf8_lossy(&output.stdout).contains(" 1 passed;"),
        "{case} did not run: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    drop(pty.master);
}

/// Whether this run is `case`'s own, in its session.
fn is_case(case: &str) -> bool {
    std::env::var(CASE).is_ok_and(|c| c == case)
}

/// Whether a process started now can open `/dev/tty`, as a function would.
fn a_child_opens_the_terminal() -> bool {
    Command::new("/bin/sh")
        .args(["-c", "exec 3<>/dev/tty"])
        .stderr(Stdio::null())
        .status()
        .expect("run /bin/sh")
        .success()
}

#[test]
fn a_runner_started_from_a_terminal_knows_it() {
    run_in_a_session("on_a_terminal", true);
}

#[test]
#[ignore = "a case run in a session of its own by the test above"]
fn on_a_terminal() {
    if !is_case("on_a_terminal") {
        return;
    }
    assert_eq!(controlling_terminal(), Ok(true));
    assert!(
        a_child_opens_the_terminal(),
        "what the runner starts opens its terminal"
    );
}

#[test]
fn a_runner_started_without_a_terminal_knows_it() {
    run_in_a_session("without_a_terminal", false);
}

#[test]
#[ignore = "a case run in a session of its own by the test above"]
fn without_a_terminal() {
    if !is_case("without_a_terminal") {
        return;
    }
    assert_eq!(controlling_terminal(), Ok(false));
    assert!(!a_child_opens_the_terminal(), "a terminal after all");
}
