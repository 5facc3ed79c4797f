//! Per-LB-group accounting of the memory the LB needs: a call's memory is assigned to its
//! group when the call arrives and released when it ends (the guard's drop), so the totals
//! cover calls waiting for a runner as well as calls running.
//!
//! Beside each group's current total it keeps the most the group needed since the last
//! advert (its high-water mark), which is what the advertiser sends: under light traffic a
//! snapshot of the current total often reads zero between two calls of a busy group. And it
//! keeps whether the npm believes the group idle (its last advert said zero or left the group
//! out), so that only a rise from zero the npm has not heard of wakes the advertiser.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// One group's figures.
#[derive(Debug, Clone, Copy)]
struct Demand {
    /// MB of the calls in flight or waiting now.
    now: u64,
    /// The most `now` has been since the last advert's snapshot.
    peak: u64,
    /// Whether the npm believes the group idle: no advert the npm took named it above zero
    /// since it was last named at zero (or left out). A rise from zero wakes the advertiser
    /// only then: one the npm already sees as busy waits for the tick.
    idle_at_npm: bool,
}

impl Demand {
    const NEW: Demand = Demand {
        now: 0,
        peak: 0,
        idle_at_npm: true,
    };
}

/// Memory in MB per LB group. Cheap to clone; shared by the call path and the advertiser.
#[derive(Debug, Clone, Default)]
pub struct CapacityTracker {
    /// Group → figures. Groups stay listed at 0 once seen, so the advertiser can send a
    /// final zero; [`CapacityTracker::advertised`] removes them afterwards. `Arc<str>` keys:
    /// a call's guard shares its group's name instead of copying it.
    groups: Arc<Mutex<BTreeMap<Arc<str>, Demand>>>,
    /// Woken when the demand of a group the npm believes idle rises from zero: the advertiser
    /// tells the npm at once instead of at its next tick (scale from zero without waiting).
    rose: Arc<tokio::sync::Notify>,
}

impl CapacityTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Arc<str>, Demand>> {
        // Updates are single map operations; a poisoned lock still holds consistent data.
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Assigns `memory_mb` to `group` until the guard drops.
    pub fn assign(&self, group: &str, memory_mb: u64) -> CapacityGuard {
        let (group, from_zero) = {
            let mut groups = self.lock();
            // Looked up first: only a group's first call allocates its name.
            let group = match groups.get_key_value(group) {
                Some((name, _)) => Arc::clone(name),
                None => Arc::from(group),
            };
            let demand = groups.entry(Arc::clone(&group)).or_insert(Demand::NEW);
            let from_zero = demand.now == 0 && memory_mb > 0 && demand.idle_at_npm;
            demand.now = demand.now.saturating_add(memory_mb);
            demand.peak = demand.peak.max(demand.now);
            (group, from_zero)
        };
        if from_zero {
            self.rose.notify_one();
        }
        CapacityGuard {
            tracker: self.clone(),
            group,
            memory_mb,
        }
    }

    /// Completes when the demand of a group the npm believes idle has risen from zero since
    /// the last time this completed (one waiter: the advertiser).
    pub async fn risen_from_zero(&self) {
        self.rose.notified().await;
    }

    /// Current totals of every group seen and not forgotten.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .map(|(group, d)| (group.to_string(), d.now))
            .collect()
    }

    /// What an advert carries: the most each group seen and not forgotten needed since the
    /// previous call of this (its high-water mark), which restarts from the current total. A
    /// call that began and ended between two adverts is in the next one.
    pub fn snapshot_for_advert(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter_mut()
            .map(|(group, d)| {
                let peak = d.peak.max(d.now);
                d.peak = d.now;
                (group.to_string(), peak)
            })
            .collect()
    }

    /// Gives back high-water marks taken by [`CapacityTracker::snapshot_for_advert`] that
    /// the npm did not hear (the advert failed, or left the group out), so that the next
    /// advert carries them: a failed advert otherwise lost its interval's most demand.
    pub fn not_advertised<'a>(&self, peaks: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut groups = self.lock();
        for (group, mb) in peaks {
            if let Some(d) = groups.get_mut(group) {
                d.peak = d.peak.max(mb);
            }
        }
    }

    /// Whether a group the npm believes idle has demand now: what an early advert is for.
    pub fn unannounced_demand(&self) -> bool {
        self.lock().values().any(|d| d.now > 0 && d.idle_at_npm)
    }

    /// Records an advert the npm took, which said `sent` (group → MB; a group left out counts
    /// as zero at the npm): a group it named above zero is busy to the npm, every other idle.
    /// A group it named at zero that has had no call since is forgotten; one that has calls
    /// now (they came while the advert was on its way) wakes the advertiser, as their rise
    /// from zero would have.
    pub fn advertised(&self, sent: &BTreeMap<&str, u64>) {
        let mut unannounced = false;
        self.lock().retain(|group, d| {
            let said = sent.get(&**group).copied();
            d.idle_at_npm = said.unwrap_or(0) == 0;
            unannounced |= d.idle_at_npm && d.now > 0;
            !(said == Some(0) && d.now == 0 && d.peak == 0)
        });
        if unannounced {
            self.rose.notify_one();
        }
    }
}

/// Releases a call's memory from its group when dropped (on every path).
#[derive(Debug)]
pub struct CapacityGuard {
    tracker: CapacityTracker,
    group: Arc<str>,
    memory_mb: u64,
}

impl Drop for CapacityGuard {
    fn drop(&mut self) {
        let mut map = self.tracker.lock();
        if let Some(demand) = map.get_mut(&self.group) {
            demand.now = demand.now.saturating_sub(self.memory_mb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assign_and_release_per_group() {
        let t = CapacityTracker::new();
        let a = t.assign("g1", 128);
        let b = t.assign("g1", 256);
        let c = t.assign("g2", 64);
        assert_eq!(t.snapshot()["g1"], 384);
        assert_eq!(t.snapshot()["g2"], 64);
        drop(a);
        drop(c);
        assert_eq!(t.snapshot()["g1"], 256);
        assert_eq!(t.snapshot()["g2"], 0);
        assert_eq!(t.snapshot_for_advert()["g2"], 64, "g2's call, ended since");
        t.advertised(&BTreeMap::from([("g1", 384), ("g2", 64)]));
        assert_eq!(t.snapshot_for_advert()["g2"], 0);
        t.advertised(&BTreeMap::from([("g1", 256), ("g2", 0)]));
        assert_eq!(
            t.snapshot().len(),
            1,
            "g1 still busy, g2 forgotten at its final zero"
        );
        drop(b);
        assert_eq!(t.snapshot()["g1"], 0);
    }

    #[test]
    fn a_high_water_mark_not_advertised_is_kept_for_the_next_advert() {
        let t = CapacityTracker::new();
        drop(t.assign("g", 128));
        let taken = t.snapshot_for_advert();
        assert_eq!(taken["g"], 128);
        assert_eq!(t.snapshot_for_advert()["g"], 0, "taken: the mark restarts");
        t.not_advertised(taken.iter().map(|(g, mb)| (g.as_str(), *mb)));
        t.not_advertised([("unknown", 512)]);
        let again = t.snapshot_for_advert();
        assert_eq!(again["g"], 128, "given back: {again:?}");
        assert!(!again.contains_key("unknown"), "{again:?}");
    }

    #[test]
    fn huge_demand_saturates_instead_of_overflowing() {
        let t = CapacityTracker::new();
        let huge = t.assign("g", u64::MAX);
        let one = t.assign("g", 1);
        assert_eq!(t.snapshot()["g"], u64::MAX);
        drop(huge);
        drop(one);
        assert_eq!(t.snapshot()["g"], 0);
    }

    #[tokio::test]
    async fn demand_rising_from_zero_wakes_the_advertiser_once() {
        let t = CapacityTracker::new();
        let soon = std::time::Duration::from_millis(20);
        let first = t.assign("g", 128);
        tokio::time::timeout(soon, t.risen_from_zero())
            .await
            .expect("from zero: woken");
        let second = t.assign("g", 128);
        assert!(
            tokio::time::timeout(soon, t.risen_from_zero())
                .await
                .is_err(),
            "more demand on a busy group waits for the tick"
        );
        drop(first);
        drop(second);
        let _again = t.assign("g", 64);
        tokio::time::timeout(soon, t.risen_from_zero())
            .await
            .expect("from zero again: woken");
    }

    /// The advert's figure is the most a group needed since the previous advert: a call that
    /// began and ended between two adverts is in the next one, and only in that one.
    #[test]
    fn an_advert_carries_the_most_each_group_needed_since_the_previous_one() {
        let t = CapacityTracker::new();
        let busy = t.assign("g1", 64);
        drop(t.assign("g2", 128));
        let first = t.assign("g1", 256);
        drop(first);
        assert_eq!(t.snapshot()["g1"], 64, "the current total");
        assert_eq!(t.snapshot()["g2"], 0, "the current total");
        let advert = t.snapshot_for_advert();
        assert_eq!(advert["g1"], 320, "both calls of g1 ran at once");
        assert_eq!(
            advert["g2"], 128,
            "g2's call came and went before the advert"
        );
        let next = t.snapshot_for_advert();
        assert_eq!(next["g1"], 64, "the mark restarts from the current total");
        assert_eq!(next["g2"], 0);
        drop(busy);
    }

    /// Only a rise from zero the npm has not heard of wakes the advertiser: a group the
    /// last advert named above zero waits for the tick, one it named at zero or left out
    /// wakes it again; a group forgotten after its final zero is new again.
    #[tokio::test]
    async fn only_a_rise_the_npm_has_not_heard_of_wakes_the_advertiser() {
        let t = CapacityTracker::new();
        let soon = std::time::Duration::from_millis(20);
        let woken = |t: &CapacityTracker| {
            let t = t.clone();
            async move {
                tokio::time::timeout(soon, t.risen_from_zero())
                    .await
                    .is_ok()
            }
        };
        drop(t.assign("g", 128));
        assert!(woken(&t).await, "a new group: woken");
        t.advertised(&BTreeMap::from([("g", 128)]));
        drop(t.assign("g", 128));
        assert!(!woken(&t).await, "the npm sees g busy: no wake");
        assert!(!t.unannounced_demand());

        // Left out (cut from an advert over the npm's limit): idle to the npm.
        t.advertised(&BTreeMap::new());
        let call = t.assign("g", 128);
        assert!(woken(&t).await, "left out: woken");
        assert!(t.unannounced_demand());
        drop(call);
        assert!(!t.unannounced_demand(), "no demand now");

        // Named at zero while a call came: that call wakes the advertiser when the advert
        // is taken, its rise having found the group busy at the npm.
        t.advertised(&BTreeMap::from([("g", 128)]));
        let during = t.assign("g", 64);
        assert!(!woken(&t).await);
        t.advertised(&BTreeMap::from([("g", 0)]));
        assert!(woken(&t).await, "idle to the npm, busy here: woken");
        assert_eq!(t.snapshot()["g"], 64, "not forgotten: it has a call");
        drop(during);
    }
}
