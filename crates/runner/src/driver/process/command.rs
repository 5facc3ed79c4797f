//! Vetting what a spec asks to run: the program (only executables inside the functions
//! directory) and the config entries that become environment variables; and the
//! [`FunctionUser`] functions run as. Pure checks on the file system; nothing is started here.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::unistd::{Uid, User};

use super::SetupError;
use crate::driver::DriverError;

/// The unprivileged user (and group) function processes run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionUser {
    pub uid: u32,
    pub gid: u32,
}

impl FunctionUser {
    /// Looks a user up in the system's user database, by name or by numeric uid; the gid
    /// is the user's primary group.
    ///
    /// # Errors
    /// [`SetupError::FunctionUser`] when there is no such user, the lookup fails, or the
    /// user is root (uid or primary group 0).
    pub fn lookup(name: &str) -> Result<Self, SetupError> {
        let fail = |reason: String| SetupError::FunctionUser {
            name: name.to_owned(),
            reason,
        };
        let found = match name.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(name),
        }
        .map_err(|e| fail(format!("lookup failed: {e}")))?;
        let user = found.ok_or_else(|| fail("no such user".into()))?;
        if user.uid.is_root() || user.gid.as_raw() == 0 {
            // Root in a function's namespaces could undo them, and outside them it is the
            // runner's equal: functions always run unprivileged.
            return Err(fail(
                "functions never run as root (uid or primary group 0): name an unprivileged user"
                    .into(),
            ));
        }
        Ok(FunctionUser {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }
}

/// A range of uids (and the same gids) to give functions one each (`FN_FUNCTION_UIDS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// `100000-165535`, as systemd's and container engines' subordinate ranges sit: above
    /// every ordinary user.
    pub const DEFAULT: UidRange = UidRange {
        first: 100_000,
        last: 165_535,
    };

    /// Parses `first-last`.
    ///
    /// # Errors
    /// A message saying what a valid range looks like.
    pub fn parse(text: &str) -> Result<Self, String> {
        let usage = || format!("{text:?}: expected a uid range such as 100000-165535");
        let (first, last) = text.trim().split_once('-').ok_or_else(usage)?;
        let first: u32 = first.trim().parse().map_err(|_| usage())?;
        let last: u32 = last.trim().parse().map_err(|_| usage())?;
        if first == 0 || last < first || last == u32::MAX {
            return Err(format!(
                "{text:?}: the range must be ascending, above 0 and below {}",
                u32::MAX
            ));
        }
        Ok(UidRange { first, last })
    }

    /// How many uids the range holds.
    pub fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Never: a range holds at least one uid.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The host's account and subordinate id files, as text (empty where unreadable).
#[derive(Debug, Default)]
pub(crate) struct HostIds {
    pub(crate) passwd: String,
    pub(crate) group: String,
    pub(crate) subuid: String,
    pub(crate) subgid: String,
}

impl HostIds {
    pub(crate) fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        HostIds {
            passwd: read("/etc/passwd"),
            group: read("/etc/group"),
            subuid: read("/etc/subuid"),
            subgid: read("/etc/subgid"),
        }
    }
}

/// What on the host already uses ids of `range` (a function's gid is its uid): accounts and
/// their primary groups (`/etc/passwd`), groups (`/etc/group`) and subordinate ranges
/// (`/etc/subuid`, `/etc/subgid`; `useradd` hands out 100000-165535 first, the default
/// range), each said in a few words.
pub(crate) fn uids_in_use(range: UidRange, host: &HostIds) -> Vec<String> {
    let within = |first: u64, count: u64| {
        let last = first.saturating_add(count.saturating_sub(1));
        count > 0 && first <= u64::from(range.last) && last >= u64::from(range.first)
    };
    let mut found = Vec::new();
    for line in host.passwd.lines() {
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(uid), gid) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if let Ok(uid) = uid.parse::<u64>()
            && within(uid, 1)
        {
            found.push(format!("the account {name} (uid {uid})"));
        } else if let Some(Ok(gid)) = gid.map(str::parse::<u64>)
            && within(gid, 1)
        {
            found.push(format!("the primary group of account {name} (gid {gid})"));
        }
    }
    for line in host.group.lines() {
        let mut fields = line.split(':');
        if let (Some(name), Some(_), Some(gid)) = (fields.next(), fields.next(), fields.next())
            && let Ok(gid) = gid.parse::<u64>()
            && within(gid, 1)
        {
            found.push(format!("the group {name} (gid {gid})"));
        }
    }
    for (file, text) in [("/etc/subuid", &host.subuid), ("/etc/subgid", &host.subgid)] {
        for line in text.lines() {
            let mut fields = line.split(':');
            if let (Some(owner), Some(first), Some(count)) =
                (fields.next(), fields.next(), fields.next())
                && let (Ok(first), Ok(count)) =
                    (first.trim().parse::<u64>(), count.trim().parse::<u64>())
                && within(first, count)
            {
                found.push(format!(
                    "{owner}'s subordinate ids {first}-{} in {file}",
                    first.saturating_add(count - 1)
                ));
            }
        }
    }
    found
}

/// Who functions run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionUsers {
    /// As the runner's own user (a runner that is not root): functions are not isolated from
    /// each other, nor from the runner.
    Runner,
    /// All as one unprivileged user (`FN_FUNCTION_USER`): the runner is safe from them, but
    /// they are not isolated from each other.
    Shared(FunctionUser),
    /// Each function (app and name) as a uid and gid of its own from the range, kept in the
    /// host's table (`FN_FUNCTION_UID_TABLE`, shared by every runner of the host): one
    /// function cannot read, signal or trace another's processes or files. See the `uids`
    /// module for which uid a function gets.
    PerFunction(UidRange),
}

impl FunctionUsers {
    /// Whether a function of the process driver may run as `uid`.
    pub fn may_run_as(&self, uid: u32) -> bool {
        match self {
            FunctionUsers::Runner => false,
            FunctionUsers::Shared(user) => user.uid == uid,
            FunctionUsers::PerFunction(range) => (range.first..=range.last).contains(&uid),
        }
    }
}

/// Resolves `program` (a spec's `command[0]`) inside `functions_dir`, which must already be
/// canonical. Returns the canonical path of the executable.
///
/// Rejects absolute paths, `..` components, anything whose canonical path (symlinks
/// resolved) leaves the functions directory, and anything that is not an executable regular
/// file. The operator owns the functions directory, so the check-then-exec gap is not a
/// concern: a function cannot swap files in it.
///
/// # Errors
/// [`DriverError::Invalid`] naming the program and what is wrong with it.
pub(super) fn resolve_program(functions_dir: &Path, program: &str) -> Result<PathBuf, DriverError> {
    let invalid = |why: &str| DriverError::Invalid(format!("command {program:?} {why}"));
    if program.is_empty() {
        return Err(invalid("is empty"));
    }
    if program.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let relative = Path::new(program);
    if relative.is_absolute() {
        return Err(invalid(
            "is an absolute path; commands are resolved inside the functions directory",
        ));
    }
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(invalid(
            "contains `..`; commands must stay inside the functions directory",
        ));
    }
    let resolved = std::fs::canonicalize(functions_dir.join(relative))
        .map_err(|e| invalid(&format!("not found in the functions directory: {e}")))?;
    if !resolved.starts_with(functions_dir) {
        return Err(invalid("resolves outside the functions directory"));
    }
    let meta =
        std::fs::metadata(&resolved).map_err(|e| invalid(&format!("cannot be inspected: {e}")))?;
    if !meta.is_file() {
        return Err(invalid("is not a regular file"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(invalid("is not executable"));
    }
    Ok(resolved)
}

/// The wrapper shell ([`super::WRAPPER_SHELL`]) when it is an executable file.
pub(super) fn wrapper_shell() -> Option<PathBuf> {
    let shell = Path::new(super::WRAPPER_SHELL);
    std::fs::metadata(shell)
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .then(|| shell.to_path_buf())
}

/// Checks that every config entry can be an environment variable.
///
/// # Errors
/// [`DriverError::Invalid`] naming the first bad key.
pub(crate) fn check_config(config: &BTreeMap<String, String>) -> Result<(), DriverError> {
    for (key, value) in config {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(DriverError::Invalid(format!(
                "config key {key:?} cannot be an environment variable name"
            )));
        }
        if value.contains('\0') {
            return Err(DriverError::Invalid(format!(
                "config value of {key:?} contains a NUL byte"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_the_host_already_uses_in_the_range_are_named() {
        let host = HostIds {
            passwd: "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n\
                     svc:x:120000:120000::/:/bin/false\n"
                .into(),
            group: "root:x:0:\nshared:x:150000:alice\n".into(),
            subuid: "alice:100000:65536\nbob:165536:65536\n".into(),
            subgid: "garbage\nalice:100000:65536\n".into(),
        };
        let found = uids_in_use(UidRange::DEFAULT, &host);
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[0].contains("svc (uid 120000)"), "{found:?}");
        assert!(
            found[1].contains("the group shared (gid 150000)"),
            "{found:?}"
        );
        assert!(found[2].contains("alice's subordinate ids 100000-165535 in /etc/subuid"));
        assert!(found[3].contains("/etc/subgid"));
        let clear = UidRange::parse("300000-365535").expect("range");
        assert!(uids_in_use(clear, &host).is_empty());
    }
    use std::os::unix::fs::symlink;

    fn functions_dir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("functions");
        std::fs::create_dir(&dir).expect("mkdir");
        let exe = dir.join("fn-ok");
        std::fs::write(&exe, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(dir.join("data.txt"), "x").expect("write");
        std::fs::create_dir(dir.join("sub")).expect("mkdir");
        std::fs::write(tmp.path().join("outside"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(
            tmp.path().join("outside"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        symlink(tmp.path().join("outside"), dir.join("escape")).expect("symlink");
        symlink(&exe, dir.join("alias")).expect("symlink");
        let canonical = std::fs::canonicalize(&dir).expect("canonicalize");
        (tmp, canonical)
    }

    fn invalid(dir: &Path, program: &str) -> String {
        match resolve_program(dir, program) {
            Err(DriverError::Invalid(msg)) => msg,
            other => panic!("{program:?}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn accepts_executables_inside() {
        let (_tmp, dir) = functions_dir();
        assert_eq!(resolve_program(&dir, "fn-ok").ok(), Some(dir.join("fn-ok")));
        assert_eq!(
            resolve_program(&dir, "./fn-ok").ok(),
            Some(dir.join("fn-ok"))
        );
        // A symlink that stays inside resolves to its target.
        assert_eq!(resolve_program(&dir, "alias").ok(), Some(dir.join("fn-ok")));
    }

    #[test]
    fn rejects_escapes_and_non_executables() {
        let (_tmp, dir) = functions_dir();
        assert!(invalid(&dir, "/bin/sh").contains("absolute"));
        assert!(invalid(&dir, "../outside").contains(".."));
        assert!(invalid(&dir, "sub/../fn-ok").contains(".."));
        assert!(invalid(&dir, "escape").contains("outside the functions directory"));
        assert!(invalid(&dir, "data.txt").contains("not executable"));
        assert!(invalid(&dir, "sub").contains("not a regular file"));
        assert!(invalid(&dir, "missing").contains("not found"));
        assert!(invalid(&dir, "").contains("empty"));
    }

    #[test]
    fn config_keys_must_be_env_names() {
        let ok = BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]);
        assert!(check_config(&ok).is_ok());
        for bad in ["", "A=B", "A\0"] {
            let config = BTreeMap::from([(bad.to_owned(), "v".to_owned())]);
            assert!(
                matches!(check_config(&config), Err(DriverError::Invalid(_))),
                "{bad:?}"
            );
        }
        let config = BTreeMap::from([("K".to_owned(), "a\0b".to_owned())]);
        assert!(matches!(
            check_config(&config),
            Err(DriverError::Invalid(_))
        ));
    }

    #[test]
    fn looks_up_users_by_name_and_uid_and_never_root() {
        let nobody = FunctionUser::lookup("nobody").expect("user nobody");
        assert_ne!(nobody.uid, 0);
        assert_eq!(
            FunctionUser::lookup(&nobody.uid.to_string()).ok(),
            Some(nobody)
        );
        for root in ["root", "0"] {
            let err = FunctionUser::lookup(root).expect_err("root refused");
            assert!(err.to_string().contains("never run as root"), "{err}");
        }
        assert!(matches!(
            FunctionUser::lookup("no-such-user-here"),
            Err(SetupError::FunctionUser { .. })
        ));
    }

    #[test]
    fn the_users_functions_may_run_as() {
        let range = UidRange::parse("100000-100009").expect("range");
        assert!(FunctionUsers::PerFunction(range).may_run_as(100_000));
        assert!(FunctionUsers::PerFunction(range).may_run_as(100_009));
        assert!(!FunctionUsers::PerFunction(range).may_run_as(100_010));
        assert!(!FunctionUsers::PerFunction(range).may_run_as(65534));
        let nobody = FunctionUser {
            uid: 65534,
            gid: 65534,
        };
        assert!(FunctionUsers::Shared(nobody).may_run_as(65534));
        assert!(!FunctionUsers::Shared(nobody).may_run_as(0));
        assert!(!FunctionUsers::Runner.may_run_as(65534));
    }
}
