//! The runner's controlling terminal, which every process it starts outside namespaces
//! inherits.
//!
//! A runner started from a terminal (an operator's shell, `docker run -it`, the npm of
//! `make demo` run by hand) is in that terminal's session, and so is every function
//! instance it starts outside namespaces: the function can open `/dev/tty`, whatever its
//! uid, to write to the operator's terminal, read what they type, or (where the kernel
//! still allows `TIOCSTI`) push keystrokes into their shell. `fn-isolate` gives an instance
//! in namespaces a session of its own. For the others the runner can only warn at start
//! ([`controlling_terminal`]): with no `unsafe` code it can neither start each instance in
//! a session of its own (`setsid` between fork and exec) nor drop its terminal
//! (`TIOCNOTTY`), and leaving the terminal's session itself (`setsid`) would take the
//! terminal's Ctrl-C and hangup away from it, leaving runners behind when a test run or a
//! script started from that terminal is interrupted.

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

/// Whether this process has a controlling terminal: `/dev/tty` opens (without blocking on
/// a line that waits for its carrier, and closed at once).
///
/// # Errors
/// When the open fails for another reason than having no terminal (`ENXIO`): too many
/// open files, say. The caller cannot tell then.
pub fn controlling_terminal() -> nix::Result<bool> {
    match open(
        "/dev/tty",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(_tty) => Ok(true),
        Err(Errno::ENXIO) => Ok(false),
        Err(e) => Err(e),
    }
}
