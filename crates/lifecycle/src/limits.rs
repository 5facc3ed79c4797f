//! The process's open-file limit, raised at start.

/// Highest open-file limit asked for (an unlimited hard limit is not a usable soft one).
pub const MAX_OPEN_FILES: u64 = 1 << 20;

/// The open-file limit (`RLIMIT_NOFILE`) before and after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit the process started with: what its children should get back.
    pub inherited: u64,
    /// The soft limit in force now.
    pub in_force: u64,
}

impl OpenFiles {
    /// Whether the limit was raised, so that children would inherit more than the process
    /// was given.
    #[must_use]
    pub fn raised(&self) -> bool {
        self.in_force > self.inherited
    }
}

/// Raises the soft open-file limit to the hard one (at most 2^20): every connection, and in
/// the runner every function instance, costs descriptors, and the usual default soft limit
/// (1024) is far below what a daemon under load needs. Logs a warning, and keeps the limit
/// it has, when it cannot.
pub fn raise_open_file_limit() -> OpenFiles {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit; assuming 1024");
            return OpenFiles {
                inherited: 1024,
                in_force: 1024,
            };
        }
    };
    let kept = OpenFiles {
        inherited: soft,
        in_force: soft,
    };
    let wanted = hard.min(MAX_OPEN_FILES);
    if soft >= wanted {
        return kept;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
        Ok(()) => OpenFiles {
            inherited: soft,
            in_force: wanted,
        },
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            kept
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::resource::{Resource, getrlimit};

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one_and_the_inherited_one_is_kept() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let first = raise_open_file_limit();
        let (soft_now, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!(first.in_force, soft_now);
        assert_eq!(soft_now, hard.min(MAX_OPEN_FILES));
        assert!(first.inherited <= first.in_force);
        assert_eq!(first.raised(), first.inherited < first.in_force);
        let again = raise_open_file_limit();
        assert_eq!(again.inherited, again.in_force, "nothing left to raise");
        assert!(!again.raised());
    }
}
