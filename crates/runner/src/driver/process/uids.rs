//! The uid of each function with [`FunctionUsers::PerFunction`](super::FunctionUsers): the
//! host's table of them (`FN_FUNCTION_UID_TABLE`), a file every runner of the host shares,
//! and this runner's memory of it. It does not start anything, nor decide who functions run
//! as (the runner's configuration does).
//!
//! A uid given to a function stays that function's while the file lasts (the default lives
//! in `/run`, cleared at reboot like `/tmp`, where what a uid leaves behind mostly lives): it
//! is never given to another function, by this runner or by another runner of the host, nor
//! after a restart. A table in each runner's memory alone let two runners of one host give
//! two functions the same uid at once, and two functions whose names hash to one uid swap
//! it after a restart, so that one tenant could read another's environment, signal it or
//! trace it.
//!
//! The file holds one line per allocation, `<uid> <app>/<function>`, appended under an
//! exclusive `flock` by the runner that made it. A function's uid is its newest line whose
//! uid lies in `FN_FUNCTION_UIDS` (a narrowed range gives it a new one); a uid in any line
//! is held, in the range or not, by whichever function.

use std::collections::{HashMap, HashSet};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use super::{FunctionUser, SetupError, UidRange};
use crate::driver::DriverError;

/// How often a lookup tries the table's lock again while another runner holds it (each
/// holds it for microseconds).
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// `FN_FUNCTION_UID_TABLE` unless set.
pub const DEFAULT_UID_TABLE: &str = "/run/fn-runner/function-uids";

/// Functions by app, then name (looked up with `&str`s: no allocation on a hit).
type ByFunction = HashMap<String, HashMap<String, u32>>;

/// The host's table of function uids, and what this runner has read of it.
#[derive(Debug)]
pub(super) struct UidTable {
    path: PathBuf,
    range: UidRange,
    /// The uid of every function the file held at its last reading, in `range`: a hit costs
    /// no file-system call. What it holds stays true, since a function keeps its uid for as
    /// long as the file lasts. A std mutex, never held across the file's I/O.
    known: Mutex<ByFunction>,
}

impl UidTable {
    /// Checks the table's directory and file, creating them when missing (the directory
    /// `0700`, the file `0600`): both must be the runner's (its euid), writable by nobody
    /// else, and not symbolic links, and so must every directory above them be (or sticky,
    /// as `/tmp`), since whoever can write the table can give one function's uid to
    /// another.
    ///
    /// # Errors
    /// [`SetupError::UidTable`] saying what is wrong and what to do.
    pub(super) fn open(path: &Path, range: UidRange) -> Result<Self, SetupError> {
        let fail = |reason: String| SetupError::UidTable {
            path: path.to_path_buf(),
            reason,
        };
        let (Some(dir), Some(_)) = (path.parent(), path.file_name()) else {
            return Err(fail("not a file's path".into()));
        };
        if !path.is_absolute() {
            return Err(fail("not an absolute path".into()));
        }
        match std::fs::symlink_metadata(dir) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The directories above it as any (0755): made 0700 as well, a missing
                // `/tmp` would keep functions from the socket root under it.
                if let Some(parent) = dir.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o755)
                        .create(parent)
                        .map_err(|e| {
                            fail(format!(
                                "cannot create {}: {e}; create it or point \
                                 FN_FUNCTION_UID_TABLE at a writable directory",
                                parent.display()
                            ))
                        })?;
                }
                // Another runner of the host starting at the same moment may make it first:
                // then it is checked below as one found.
                match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(fail(format!(
                            "cannot create {}: {e}; create it (mode 0700, the runner's) or \
                             point FN_FUNCTION_UID_TABLE at a writable directory",
                            dir.display()
                        )));
                    }
                }
            }
            Err(e) => return Err(fail(format!("cannot inspect {}: {e}", dir.display()))),
        }
        let dir_meta = std::fs::symlink_metadata(dir)
            .map_err(|e| fail(format!("cannot inspect {}: {e}", dir.display())))?;
        if dir_meta.file_type().is_symlink() || !dir_meta.is_dir() {
            return Err(fail(format!(
                "{} is not a directory (a symbolic link is refused): point \
                 FN_FUNCTION_UID_TABLE into a directory of the runner's own",
                dir.display()
            )));
        }
        private(dir, &dir_meta).map_err(fail)?;
        let canonical = std::fs::canonicalize(dir)
            .map_err(|e| fail(format!("cannot resolve {}: {e}", dir.display())))?;
        for ancestor in dir.ancestors().skip(1) {
            let meta = std::fs::symlink_metadata(ancestor)
                .map_err(|e| fail(format!("cannot inspect {}: {e}", ancestor.display())))?;
            safe_ancestor(ancestor, &meta).map_err(fail)?;
        }
        for ancestor in canonical.ancestors().skip(1) {
            let meta = std::fs::metadata(ancestor)
                .map_err(|e| fail(format!("cannot inspect {}: {e}", ancestor.display())))?;
            safe_ancestor(ancestor, &meta).map_err(fail)?;
        }
        open_file(path).map_err(fail)?;
        Ok(UidTable {
            path: path.to_path_buf(),
            range,
            known: Mutex::default(),
        })
    }

    /// The uid of `app`/`function`, and whether it was given now: from memory, else from
    /// the file (another runner, or an earlier run, gave it one), else the first uid that
    /// no line of the file holds, from where the function's name hashes to in the range on.
    ///
    /// Blocks (call it off the runtime) while another runner holds the file's lock, until
    /// `deadline` at most: the lock is tried again every [`LOCK_RETRY`] rather than waited
    /// for, so that a holder that never lets go (a frozen runner, a network file system)
    /// keeps no thread here past the deadline.
    ///
    /// # Errors
    /// [`DriverError::Start`] when the file cannot be read or written, stays locked until
    /// `deadline`, or every uid of the range is held; [`DriverError::Invalid`] for a name a
    /// line could not record (the catalog allows none).
    pub(super) fn user_for(
        &self,
        app: &str,
        function: &str,
        deadline: std::time::Instant,
    ) -> Result<(FunctionUser, bool), DriverError> {
        if let Some(known) = self.known(app, function) {
            return Ok((known, false));
        }
        for name in [app, function] {
            if !recordable(name) {
                return Err(DriverError::Invalid(format!(
                    "function {app:?}/{function:?}: {name:?} cannot be recorded in \
                     FN_FUNCTION_UID_TABLE (empty, or holds a space, a '/' or a control \
                     character); rename it"
                )));
            }
        }
        let table = |reason: String| {
            DriverError::Start(format!(
                "FN_FUNCTION_UID_TABLE {}: {reason}",
                self.path.display()
            ))
        };
        // Every runner of the host appends under this lock, so what is read under it is
        // every uid given so far.
        let mut file = open_file(&self.path).map_err(table)?;
        let mut file = loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(locked) => break locked,
                Err((unlocked, nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR))
                    if std::time::Instant::now() < deadline =>
                {
                    file = unlocked;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(table(
                        "still locked by another process at the start's deadline (a stalled \
                         runner of this host, or a table on a network file system?)"
                            .into(),
                    ));
                }
                Err((_, errno)) => return Err(table(format!("cannot lock: {errno}"))),
            }
        };
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .map_err(|e| table(format!("cannot read: {e}")))?;
        let read = Lines::parse(&text, self.range, &self.path);
        let found = read.lookup(app, function);
        *self.known_map() = read.newest;
        if let Some(uid) = found {
            return Ok((user(uid), false));
        }
        let len = self.range.len();
        let home = home_offset(app, function, len);
        let uid = (0..len)
            .map(|step| (home + step) % len)
            .filter_map(|offset| u32::try_from(offset).ok())
            .map(|offset| self.range.first + offset)
            .find(|uid| !read.held.contains(uid))
            .ok_or_else(|| {
                DriverError::Start(format!(
                    "FN_FUNCTION_UIDS {}-{}: every uid is held by another function in \
                     FN_FUNCTION_UID_TABLE {}; widen the range (a function keeps its uid \
                     until the table is removed, at reboot for one in /run)",
                    self.range.first,
                    self.range.last,
                    self.path.display()
                ))
            })?;
        // After a line a crash cut short, a line of its own.
        let cut = !text.is_empty() && !text.ends_with(b"\n");
        let line = format!("{}{uid} {app}/{function}\n", if cut { "\n" } else { "" });
        file.write_all(line.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| table(format!("cannot append: {e}")))?;
        self.known_map()
            .entry(app.to_owned())
            .or_default()
            .insert(function.to_owned(), uid);
        Ok((user(uid), true))
    }

    /// The user of `app`/`function` when this runner has read it already: no file-system
    /// call.
    pub(super) fn known(&self, app: &str, function: &str) -> Option<FunctionUser> {
        self.known_map().get(app)?.get(function).copied().map(user)
    }

    fn known_map(&self) -> std::sync::MutexGuard<'_, ByFunction> {
        // A map of uids each written whole: a panic elsewhere cannot leave it inconsistent.
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn user(uid: u32) -> FunctionUser {
    FunctionUser { uid, gid: uid }
}

/// Opens (or creates, mode `0600`) the table file for reading and appending, not through a
/// link, and checks that it is a regular file of the runner's that nobody else may write.
fn open_file(path: &Path) -> Result<std::fs::File, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("cannot open (a symbolic link is refused): {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot inspect: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    private(path, &meta)?;
    Ok(file)
}

/// The table file or its directory: the runner's own and writable by nobody else.
fn private(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    let own = nix::unistd::geteuid().as_raw();
    if meta.uid() != own {
        return Err(format!(
            "{} is owned by uid {}, not the runner's ({own}): its owner could give one \
             function's uid to another; remove it (the runner makes it) or chown it",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is mode {:o}, writable by other users, who could give one function's uid to \
             another; chmod go-w it",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// A directory above the table: root's or the runner's, and writable by nobody else unless
/// sticky (`/tmp`: others cannot rename what is the runner's in it). A link is checked by
/// the directory holding it, and its target by the canonical path.
fn safe_ancestor(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    let own = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != own {
        return Err(format!(
            "{} is owned by uid {}, who could replace the table; keep FN_FUNCTION_UID_TABLE \
             under directories of root's",
            path.display(),
            meta.uid()
        ));
    }
    let sticky = meta.mode() & 0o1000 != 0;
    if !meta.file_type().is_symlink() && meta.mode() & 0o022 != 0 && !sticky {
        return Err(format!(
            "{} is mode {:o}, writable by other users, who could replace the table; keep \
             FN_FUNCTION_UID_TABLE under directories only root writes",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Whether `name` can be half of a line's `<app>/<function>` without ambiguity.
fn recordable(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c == ' ' || c == '/' || c.is_control())
}

/// What the file says.
#[derive(Debug, Default)]
struct Lines {
    /// Each function's newest uid in the range.
    newest: ByFunction,
    /// Every uid a line names, whoever holds it and whether in the range or not.
    held: HashSet<u32>,
}

impl Lines {
    /// Reads the file's lines; one that does not read, or names a uid a line above gives
    /// another function (an edit by hand), is skipped with a warning, its uid still held.
    fn parse(text: &[u8], range: UidRange, path: &Path) -> Lines {
        let mut lines = Lines::default();
        let mut owner: HashMap<u32, (&str, &str)> = HashMap::new();
        let mut skipped = Vec::new();
        for (index, line) in text.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let Some((uid, app, function)) = parse_line(line) else {
                // Held all the same when its uid reads, so that no function is given it.
                if let Some(uid) = line
                    .split(|b| *b == b' ')
                    .next()
                    .and_then(|uid| std::str::from_utf8(uid).ok())
                    .and_then(|uid| uid.parse().ok())
                {
                    lines.held.insert(uid);
                }
                skipped.push(index + 1);
                continue;
            };
            lines.held.insert(uid);
            match owner.get(&uid) {
                Some(&holder) if holder != (app, function) => {
                    skipped.push(index + 1);
                    continue;
                }
                Some(_) => {}
                None => {
                    owner.insert(uid, (app, function));
                }
            }
            if (range.first..=range.last).contains(&uid) {
                lines
                    .newest
                    .entry(app.to_owned())
                    .or_default()
                    .insert(function.to_owned(), uid);
            }
        }
        if !skipped.is_empty() {
            tracing::warn!(
                table = %path.display(),
                lines = ?skipped,
                "FN_FUNCTION_UID_TABLE: lines skipped (not `<uid> <app>/<function>`, or a uid \
                 a line above gives another function); their uids are given to no function"
            );
        }
        lines
    }

    fn lookup(&self, app: &str, function: &str) -> Option<u32> {
        self.newest.get(app)?.get(function).copied()
    }
}

/// `<uid> <app>/<function>`, digits only in the uid.
fn parse_line(line: &[u8]) -> Option<(u32, &str, &str)> {
    let line = std::str::from_utf8(line).ok()?;
    let (uid, name) = line.split_once(' ')?;
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let uid = uid.parse().ok()?;
    let (app, function) = name.split_once('/')?;
    (recordable(app) && recordable(function)).then_some((uid, app, function))
}

/// Where `app`/`function` hashes to in a range of `len` uids: the first uid it is offered
/// (SipHash with fixed keys, so the same on every host; the table decides the rest).
fn home_offset(app: &str, function: &str, len: u64) -> u64 {
    use std::hash::Hasher;
    let mut hasher = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    hasher.write(app.as_bytes());
    hasher.write_u8(0);
    hasher.write(function.as_bytes());
    hasher.finish() % len
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline no test's lookup comes near.
    fn soon() -> std::time::Instant {
        std::time::Instant::now() + std::time::Duration::from_secs(30)
    }
    use std::os::unix::fs::PermissionsExt as _;

    const SMALL: UidRange = UidRange {
        first: 1000,
        last: 1015,
    };

    /// A table file in a directory of its own (removed with the returned guard).
    fn table_path() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("uids").join("function-uids");
        (tmp, path)
    }

    /// One runner's table over the file at `path`.
    fn runner(path: &Path, range: UidRange) -> UidTable {
        UidTable::open(path, range).expect("uid table")
    }

    fn uid(table: &UidTable, function: &str) -> u32 {
        table.user_for("app", function, soon()).expect("uid").0.uid
    }

    /// A lookup that finds the file locked by a holder that does not let go gives up at its
    /// deadline, naming the table, and leaves no thread waiting; once the lock is let go, a
    /// lookup gets its uid.
    #[test]
    fn a_lookup_gives_up_at_its_deadline_while_the_table_stays_locked() {
        let (_dir, path) = table_path();
        let table = std::sync::Arc::new(runner(&path, SMALL));
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("table");
        let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .expect("lock");
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn({
            let table = std::sync::Arc::clone(&table);
            move || {
                let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
                drop(done.send(table.user_for("app", "f", deadline)));
            }
        });
        let outcome = outcome.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        let Ok(Err(DriverError::Start(said))) = outcome else {
            panic!("the lookup did not give up at its deadline: {outcome:?}");
        };
        assert!(
            said.contains("FN_FUNCTION_UID_TABLE") && said.contains("still locked"),
            "{said}"
        );
        assert_eq!(
            uid(&table, "f"),
            SMALL.first + home_offset("app", "f", SMALL.len()) as u32
        );
    }

    /// Two function names of `app` whose names hash to the same uid of `range`.
    fn colliding(range: UidRange) -> (String, String) {
        let home = |n: &str| home_offset("app", n, range.len());
        let first = "f0".to_owned();
        let second = (1..10_000)
            .map(|i| format!("f{i}"))
            .find(|n| home(n) == home(&first))
            .expect("a collision in a small range");
        (first, second)
    }

    #[test]
    fn two_runners_give_colliding_functions_two_uids_whichever_is_called_first() {
        let (a, b) = colliding(SMALL);
        for (first, second) in [(&a, &b), (&b, &a)] {
            let (_tmp, path) = table_path();
            let one = runner(&path, SMALL);
            let two = runner(&path, SMALL);
            let first_uid = uid(&one, first);
            let second_uid = uid(&two, second);
            assert_ne!(
                first_uid, second_uid,
                "{first} on one runner and {second} on another share a uid"
            );
            // The same function has the same uid on both runners.
            assert_eq!(uid(&two, first), first_uid);
            assert_eq!(uid(&one, second), second_uid);
            assert!(SMALL.first <= first_uid && second_uid <= SMALL.last);
        }
    }

    #[test]
    fn after_a_restart_each_function_gets_its_uid_again_whatever_the_order() {
        let (a, b) = colliding(SMALL);
        let (_tmp, path) = table_path();
        let before = runner(&path, SMALL);
        let (uid_a, uid_b) = (uid(&before, &a), uid(&before, &b));
        assert_ne!(uid_a, uid_b);
        drop(before);
        let after = runner(&path, SMALL);
        assert_eq!((uid(&after, &b), uid(&after, &a)), (uid_b, uid_a));
        // A hit from memory says the uid is not new; the first reading did not either.
        let (user, new) = after.user_for("app", &a, soon()).expect("uid");
        assert_eq!((user.uid, user.gid, new), (uid_a, uid_a, false));
        let text = std::fs::read_to_string(&path).expect("table");
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn a_full_range_is_an_error_naming_both_settings() {
        let range = UidRange {
            first: 1000,
            last: 1001,
        };
        let (_tmp, path) = table_path();
        let one = runner(&path, range);
        let two = runner(&path, range);
        let (x, y) = (uid(&one, "x"), uid(&two, "y"));
        assert_ne!(x, y);
        let err = one.user_for("app", "z", soon()).expect_err("full");
        let message = err.to_string();
        assert!(matches!(err, DriverError::Start(_)), "{message}");
        for setting in [
            "FN_FUNCTION_UIDS",
            "FN_FUNCTION_UID_TABLE",
            "widen the range",
        ] {
            assert!(message.contains(setting), "{message}");
        }
    }

    #[test]
    fn a_uid_outside_a_narrowed_range_is_not_used_nor_given_to_another() {
        let (_tmp, path) = table_path();
        std::fs::create_dir(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, "1000 app/old\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let narrowed = UidRange {
            first: 2000,
            last: 2009,
        };
        let moved = uid(&runner(&path, narrowed), "old");
        assert!((2000..=2009).contains(&moved), "{moved}");
        // Back to a range holding both: the newest line in the range wins.
        let wide = UidRange {
            first: 1000,
            last: 2009,
        };
        assert_eq!(uid(&runner(&path, wide), "old"), moved);
        // The old uid stays held: no other function is given it.
        let only_the_old = UidRange {
            first: 1000,
            last: 1000,
        };
        let table = runner(&path, only_the_old);
        assert_eq!(uid(&table, "old"), 1000);
        let err = table
            .user_for("app", "new", soon())
            .expect_err("1000 is held");
        assert!(err.to_string().contains("FN_FUNCTION_UIDS"), "{err}");
    }

    #[test]
    fn unreadable_lines_are_skipped_their_uids_held_and_a_cut_line_is_ended() {
        let (_tmp, path) = table_path();
        std::fs::create_dir(path.parent().expect("dir")).expect("mkdir");
        let range = UidRange {
            first: 1000,
            last: 1003,
        };
        // A uid without a name, a name with a space, another function's uid, a cut line.
        std::fs::write(
            &path,
            "1000 no-slash\n1001 app/a b\n1002 app/x\n1002 app/y\n1003 app/cu",
        )
        .expect("write");
        let table = runner(&path, range);
        assert_eq!(uid(&table, "x"), 1002);
        let err = table
            .user_for("app", "y", soon())
            .expect_err("every uid is held");
        assert!(err.to_string().contains("FN_FUNCTION_UIDS"), "{err}");
        assert_eq!(uid(&table, "cu"), 1003);

        let roomier = UidRange {
            first: 1000,
            last: 1004,
        };
        assert_eq!(uid(&runner(&path, roomier), "y"), 1004);
        let text = std::fs::read_to_string(&path).expect("table");
        assert!(text.ends_with("1003 app/cu\n1004 app/y\n"), "{text:?}");
    }

    #[test]
    fn a_name_a_line_could_not_record_is_refused() {
        let (_tmp, path) = table_path();
        let table = runner(&path, SMALL);
        for (app, function) in [("app", "a/b"), ("a b", "f"), ("app", ""), ("app", "f\n")] {
            assert!(
                matches!(
                    table.user_for(app, function, soon()),
                    Err(DriverError::Invalid(_))
                ),
                "{app:?}/{function:?}"
            );
        }
        assert_eq!(std::fs::read_to_string(&path).expect("table"), "");
    }

    #[test]
    fn missing_directories_above_the_table_are_made_reachable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = tmp.path().join("above/table/function-uids");
        UidTable::open(&path, SMALL).expect("made");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").mode() & 0o777;
        // As a missing `/tmp` above the socket root would be: functions must pass through.
        assert_eq!(mode(&tmp.path().join("above")) & 0o011, 0o011);
        assert_eq!(mode(&tmp.path().join("above/table")), 0o700);
        // Runners of a host starting together: each makes the directory or finds it made.
        let path = tmp.path().join("together/function-uids");
        let ready = std::sync::Barrier::new(8);
        let opened: Vec<bool> = std::thread::scope(|scope| {
            let starts: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        ready.wait();
                        UidTable::open(&path, SMALL).is_ok()
                    })
                })
                .collect();
            starts
                .into_iter()
                .map(|start| start.join().unwrap_or(false))
                .collect()
        });
        assert!(opened.iter().all(|ok| *ok), "{opened:?}");
    }

    #[test]
    fn the_table_is_made_private_and_an_unsafe_one_is_refused() {
        let (tmp, path) = table_path();
        runner(&path, SMALL);
        let dir = path.parent().expect("dir");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").mode() & 0o777;
        assert_eq!((mode(dir), mode(&path)), (0o700, 0o600));

        let refused = |path: &Path, why: &str| {
            let err = UidTable::open(path, SMALL).expect_err(why).to_string();
            assert!(err.contains("FN_FUNCTION_UID_TABLE"), "{why}: {err}");
            err
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(refused(&path, "a 0666 file").contains("mode 666"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(refused(&path, "a 0777 directory").contains("mode 777"));
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(refused(&link, "a link to the file").contains("symbolic link"));
        let linked_dir = tmp.path().join("linked");
        std::os::unix::fs::symlink(dir, &linked_dir).expect("symlink");
        refused(&linked_dir.join("function-uids"), "a link to the directory");

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(
            refused(&open.join("d/function-uids"), "under a 0777 directory").contains("mode 777")
        );
        refused(Path::new("relative/function-uids"), "a relative path");
    }
}
