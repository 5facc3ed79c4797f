//! Per-LB-group accounting of the memory the LB needs: a call's memory is assigned to its
//! group when the call arrives and released when it ends (the guard's drop), so the totals
//! cover calls waiting for a runner as well as calls running.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Memory in MB per LB group. Cheap to clone; shared by the call path and the advertiser.
#[derive(Debug, Clone, Default)]
pub struct CapacityTracker {
    /// Group → MB. Groups stay listed at 0 once seen, so the advertiser can send a final
    /// zero; [`CapacityTracker::forget_idle`] removes them afterwards. `Arc<str>` keys: a
    /// call's guard shares its group's name instead of copying it.
    groups: Arc<Mutex<BTreeMap<Arc<str>, u64>>>,
    /// Woken when a group's demand rises from zero: the advertiser tells the npm at once
    /// instead of at its next tick (scale from zero without waiting).
    rose: Arc<tokio::sync::Notify>,
}

impl CapacityTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Arc<str>, u64>> {
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
            let total = groups.entry(Arc::clone(&group)).or_insert(0);
            let from_zero = *total == 0 && memory_mb > 0;
            *total = total.saturating_add(memory_mb);
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

    /// Completes when a group's demand has risen from zero since the last time this
    /// completed (one waiter: the advertiser).
    pub async fn risen_from_zero(&self) {
        self.rose.notified().await;
    }

    /// Current totals of every group seen and not forgotten.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .map(|(group, mb)| (group.to_string(), *mb))
            .collect()
    }

    /// Removes the groups in `groups` whose total is still zero.
    pub fn forget_idle<'a>(&self, groups: impl IntoIterator<Item = &'a String>) {
        let mut map = self.lock();
        for g in groups {
            if map.get(g.as_str()) == Some(&0) {
                map.remove(g.as_str());
            }
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
        if let Some(total) = map.get_mut(&self.group) {
            *total = total.saturating_sub(self.memory_mb);
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
        t.forget_idle(&["g1".to_string(), "g2".to_string()]);
        assert_eq!(t.snapshot().len(), 1, "g1 still busy, g2 forgotten");
        drop(b);
        assert_eq!(t.snapshot()["g1"], 0);
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
}
