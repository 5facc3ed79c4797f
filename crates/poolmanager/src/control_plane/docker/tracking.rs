//! What the docker plane knows of its runner containers beyond what the engine lists: the
//! names a provisioning or a removal under way has claimed ([`Claims`]), what the health
//! probe said of the running ones ([`Adoption`]), when each was last warned about
//! ([`Warnings`]), and since when each has been seen in a state it should leave: a removed
//! one still running, one created and never started ([`FirstSeen`]). Names only, in memory:
//! a restarted npm starts with none, and learns again from the engine and the health probe.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::control_plane::Health;

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Names, runners and instants only: what a panicking holder left is still right.
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

/// Which running runner containers the plane reports, by what their health probe said. One
/// it has seen answer SERVING (it provisioned it, or adopted it) is reported without asking
/// again, so a tick's list costs no probe per known runner. One it has not (another npm's:
/// a runner kept by `FN_DOCKER_KEEP_RUNNERS` or for the npm service's next task, one whose
/// removal was cut short while it drained, one still starting when its npm was killed) is
/// probed at each list until it answers SERVING: one that cannot be reached is reported
/// meanwhile, as any runner was before probes (the LBs probe it themselves, and a probe
/// outage must not hide healthy runners from them); one that answers otherwise (NOT_SERVING
/// as a draining or starting runner says) is held out from then on, and removed once held
/// out longer than a bound.
#[derive(Debug, Default)]
pub(super) struct Adoption(Mutex<Known>);

#[derive(Debug, Default)]
struct Known {
    /// Bumped as a list begins (see [`Adoption::begin_list`]).
    generation: u64,
    runners: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    standing: Standing,
    /// The generation it was last learned in: a list prunes only what it learned before it
    /// began.
    generation: u64,
}

/// Where a running runner container stands with the plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    /// Seen answering SERVING: reported, not probed again.
    Adopted,
    /// Not reached by any probe yet: reported, probed at each list.
    Unreached,
    /// Answered, but not SERVING, first at `since`: not reported, probed at each list.
    HeldOut { since: Instant },
}

/// What a probe's outcome made of a runner not adopted before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Observed {
    /// It answered SERVING: reported from now on.
    Adopted,
    /// Still not reached; `first` when it was not known so before.
    Unreached { first: bool },
    /// Held out for `held` (it answered, not SERVING, that long ago); `first` when it
    /// was not held out before.
    HeldOut { held: Duration, first: bool },
}

impl Adoption {
    /// `name` answered SERVING (its provisioning saw it ready).
    pub(super) fn serving(&self, name: &str) {
        let mut known = lock(&self.0);
        let generation = known.generation;
        known.runners.insert(
            name.to_owned(),
            Entry {
                standing: Standing::Adopted,
                generation,
            },
        );
    }

    pub(super) fn standing(&self, name: &str) -> Option<Standing> {
        lock(&self.0).runners.get(name).map(|e| e.standing)
    }

    /// Records what a probe of `name`, not adopted before, found at `now`. One held out
    /// stays so until it answers SERVING, through probes that do not reach it: a draining
    /// runner stops answering before it exits, and is never given back to the LBs.
    pub(super) fn observe(&self, name: &str, health: &Health, now: Instant) -> Observed {
        let mut known = lock(&self.0);
        let generation = known.generation;
        let before = known.runners.get(name).map(|e| e.standing);
        let (standing, observed) = match (health, before) {
            (Health::Serving, _) => (Standing::Adopted, Observed::Adopted),
            (_, Some(Standing::HeldOut { since })) => (
                Standing::HeldOut { since },
                Observed::HeldOut {
                    held: now.saturating_duration_since(since),
                    first: false,
                },
            ),
            (Health::NotServing(_), _) => (
                Standing::HeldOut { since: now },
                Observed::HeldOut {
                    held: Duration::ZERO,
                    first: true,
                },
            ),
            (Health::Unreachable(_), before) => (
                Standing::Unreached,
                Observed::Unreached {
                    first: before != Some(Standing::Unreached),
                },
            ),
        };
        known.runners.insert(
            name.to_owned(),
            Entry {
                standing,
                generation,
            },
        );
        observed
    }

    /// A list begins: what is learned from now on is not pruned by it (see
    /// [`Self::retain`]), whatever its engine listing, taken meanwhile, shows.
    pub(super) fn begin_list(&self) -> ListGeneration {
        let mut known = lock(&self.0);
        known.generation += 1;
        ListGeneration(known.generation)
    }

    /// Forgets the names not in `listed` (the containers are gone) that were learned before
    /// the list that took `listed` began: a provisioning that saw its runner ready while
    /// the engine listed (a swarm's list takes seconds with many services) is kept.
    pub(super) fn retain(&self, listed: &HashSet<&str>, began: ListGeneration) {
        lock(&self.0)
            .runners
            .retain(|n, e| e.generation >= began.0 || listed.contains(n.as_str()));
    }
}

/// When a list began, for [`Adoption::retain`].
#[derive(Debug, Clone, Copy)]
pub(super) struct ListGeneration(u64);

/// The repeats of the warnings about one runner not adopted yet, let through at most once
/// per interval for each runner: one throttle over all runners let the first runner's
/// repeat through and held back every other's for that interval, so a second runner that
/// misbehaved could go unseen. Names are forgotten once the engine no longer lists them
/// ([`Self::retain`]), so what is kept is bounded by the runner containers there are.
#[derive(Debug)]
pub(super) struct Warnings {
    interval: Duration,
    runners: Mutex<HashMap<String, Warned>>,
}

#[derive(Debug, Clone, Copy)]
struct Warned {
    /// When a warning about the runner was last let through.
    at: Instant,
    /// Its repeats held back since.
    held_back: u64,
}

impl Warnings {
    pub(super) fn new(interval: Duration) -> Self {
        Warnings {
            interval,
            runners: Mutex::default(),
        }
    }

    /// A first warning about `name` (of either kind) was logged at `now`, as they all are:
    /// its repeats wait an interval from then.
    pub(super) fn first(&self, name: &str, now: Instant) {
        lock(&self.runners)
            .entry(name.to_owned())
            .and_modify(|w| w.at = now)
            .or_insert(Warned {
                at: now,
                held_back: 0,
            });
    }

    /// Whether a repeat about `name` at `now` is let through, for
    /// [`fn_lifecycle::warn_throttled`] (which calls `admit` on it).
    pub(super) fn repeat<'a>(&'a self, name: &'a str, now: Instant) -> Repeat<'a> {
        Repeat {
            warnings: self,
            name,
            now,
        }
    }

    fn admit(&self, name: &str, now: Instant) -> Option<u64> {
        let mut runners = lock(&self.runners);
        let Some(warned) = runners.get_mut(name) else {
            runners.insert(
                name.to_owned(),
                Warned {
                    at: now,
                    held_back: 0,
                },
            );
            return Some(0);
        };
        if now.saturating_duration_since(warned.at) >= self.interval {
            let held_back = warned.held_back;
            *warned = Warned {
                at: now,
                held_back: 0,
            };
            Some(held_back)
        } else {
            warned.held_back = warned.held_back.saturating_add(1);
            None
        }
    }

    /// Forgets the runners not in `listed` (their containers are gone).
    pub(super) fn retain(&self, listed: &HashSet<&str>) {
        lock(&self.runners).retain(|n, _| listed.contains(n.as_str()));
    }
}

/// One repeat of a warning about a runner, for [`fn_lifecycle::warn_throttled`].
pub(super) struct Repeat<'a> {
    warnings: &'a Warnings,
    name: &'a str,
    now: Instant,
}

impl Repeat<'_> {
    /// `Some(held back)` when the repeat is let through (the first of its interval for its
    /// runner), `None` when it is held back (logged at DEBUG).
    pub(super) fn admit(&self) -> Option<u64> {
        self.warnings.admit(self.name, self.now)
    }
}

/// When the plane first saw each runner container in one state, on this npm's monotonic
/// clock, to time how long it has stayed so. The plane keeps one for runners it removed
/// that still run (a swarm service deleted whose task still drains on its node,
/// [`super::ContainerState::Leaving`]), and one for runner containers created and never
/// started ([`super::ContainerState::Created`], left by an npm killed between create and
/// start): the engine's or a label's timestamps are another clock's, or the npm's wall
/// clock, which steps (NTP, a VM restored). Each list forgets the names it no longer finds
/// so ([`Self::retain`]: gone, or for a never-started one, no longer created), so what is
/// kept is bounded by the runner containers there are.
#[derive(Debug, Default)]
pub(super) struct FirstSeen(Mutex<HashMap<String, Instant>>);

impl FirstSeen {
    /// How long before `now` `name` was first seen (zero the first time).
    pub(super) fn seen_for(&self, name: &str, now: Instant) -> Duration {
        let since = *lock(&self.0).entry(name.to_owned()).or_insert(now);
        now.saturating_duration_since(since)
    }

    /// Forgets the runners not in `listed` (gone, or no longer in the state timed).
    pub(super) fn retain(&self, listed: &HashSet<&str>) {
        lock(&self.0).retain(|n, _| listed.contains(n.as_str()));
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

    #[test]
    fn a_first_sight_is_kept_until_the_name_is_no_longer_listed() {
        let seen = FirstSeen::default();
        let start = Instant::now();
        let minute = Duration::from_secs(60);
        assert_eq!(seen.seen_for("a", start), Duration::ZERO);
        assert_eq!(seen.seen_for("b", start + minute), Duration::ZERO);
        assert_eq!(seen.seen_for("a", start + minute), minute);
        // "a" is no longer listed so: forgotten, timed again from its next sight.
        seen.retain(&HashSet::from(["b"]));
        assert_eq!(seen.seen_for("a", start + minute * 2), Duration::ZERO);
        assert_eq!(seen.seen_for("b", start + minute * 2), minute);
    }

    #[test]
    fn warnings_repeat_once_an_interval_per_runner_and_forget_runners_gone() {
        let minute = Duration::from_secs(60);
        let warnings = Warnings::new(minute);
        let start = Instant::now();
        warnings.first("a", start);
        assert_eq!(warnings.repeat("a", start).admit(), None, "after its first");
        assert_eq!(
            warnings.repeat("b", start).admit(),
            Some(0),
            "another runner's repeat is its own"
        );
        assert_eq!(warnings.repeat("a", start + minute).admit(), Some(1));
        assert_eq!(warnings.repeat("a", start + minute).admit(), None);
        // "a" is no longer listed: forgotten, its next warning is let through.
        warnings.retain(&HashSet::from(["b"]));
        assert_eq!(lock(&warnings.runners).len(), 1);
        assert_eq!(warnings.repeat("a", start + minute).admit(), Some(0));
    }
}
