//! What the docker plane knows of its runner containers beyond what the engine lists: the
//! names a provisioning or a removal under way has claimed ([`Claims`]), and those seen
//! answering health ([`Adoption`]). Names only, in memory: a restarted npm starts with
//! none, and learns again from the engine and the health probe.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Names and instants only: what a panicking holder left is still right.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Names claimed by operations under way, each held until its last claim ends: of two
/// claims on one name (two removals of one runner), the first to end leaves the other's.
#[derive(Debug, Default)]
pub(super) struct Claims(Mutex<HashMap<String, usize>>);

impl Claims {
    /// Claims `name` until the returned guard is dropped, however its holder ends.
    pub(super) fn claim(&self, name: &str) -> Claim<'_> {
        *lock(&self.0).entry(name.to_owned()).or_default() += 1;
        Claim {
            claims: self,
            name: name.to_owned(),
        }
    }

    pub(super) fn contains(&self, name: &str) -> bool {
        lock(&self.0).contains_key(name)
    }
}

/// One claim on a name of [`Claims`].
pub(super) struct Claim<'a> {
    claims: &'a Claims,
    name: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claims = lock(&self.claims.0);
        if let Some(count) = claims.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                claims.remove(&self.name);
            }
        }
    }
}

/// Which running runner containers the plane reports. One it has seen answer health (it
/// provisioned it, or a probe of it said SERVING) is reported without asking again, so a
/// tick's list costs no probe per known runner. One it has not (another npm's: a runner
/// kept by `FN_DOCKER_KEEP_RUNNERS` or for the npm service's next task, one whose removal
/// was cut short while it drained, one still starting when its npm was killed) is probed
/// at each list until it answers; one silent (or NOT_SERVING, as a draining runner says)
/// for longer than a bound is removed.
#[derive(Debug, Default)]
pub(super) struct Adoption(Mutex<Known>);

#[derive(Debug, Default)]
struct Known {
    /// Seen answering health.
    serving: HashSet<String>,
    /// Found running without answering health: since when.
    silent: HashMap<String, Instant>,
}

impl Adoption {
    /// `name` answered health.
    pub(super) fn serving(&self, name: &str) {
        let mut known = lock(&self.0);
        known.silent.remove(name);
        known.serving.insert(name.to_owned());
    }

    pub(super) fn is_serving(&self, name: &str) -> bool {
        lock(&self.0).serving.contains(name)
    }

    /// `name` did not answer health at `now`: for how long it has not, since it was first
    /// found silent; `None` when this is the first time.
    pub(super) fn silent(&self, name: &str, now: Instant) -> Option<Duration> {
        let mut known = lock(&self.0);
        match known.silent.get(name) {
            Some(since) => Some(now.saturating_duration_since(*since)),
            None => {
                known.silent.insert(name.to_owned(), now);
                None
            }
        }
    }

    /// Forgets the names not in `listed` (the containers are gone).
    pub(super) fn retain(&self, listed: &HashSet<&str>) {
        let mut known = lock(&self.0);
        known.serving.retain(|n| listed.contains(n.as_str()));
        known.silent.retain(|n, _| listed.contains(n.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_stays_claimed_until_its_last_claim_ends() {
        let claims = Claims::default();
        let first = claims.claim("r");
        let second = claims.claim("r");
        drop(first);
        assert!(claims.contains("r"), "the second claim still holds it");
        drop(second);
        assert!(!claims.contains("r"));
    }
}
