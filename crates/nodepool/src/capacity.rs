//! Per-LB-group accounting of the memory the LB needs: a call's memory is assigned to its
//! group when the call arrives and released when it ends (the guard's drop), so the totals
//! cover calls waiting for a runner as well as calls running.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Memory in MB per LB group. Cheap to clone; shared by the call path and the advertiser.
#[derive(Debug, Clone, Default)]
pub struct CapacityTracker {
    /// Group → MB. Groups stay listed at 0 once seen, so the advertiser can send a final
    /// zero; [`CapacityTracker::forget_idle`] removes them afterwards.
    groups: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl CapacityTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, u64>> {
        // Updates are single map operations; a poisoned lock still holds consistent data.
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Assigns `memory_mb` to `group` until the guard drops.
    pub fn assign(&self, group: &str, memory_mb: u64) -> CapacityGuard {
        *self.lock().entry(group.to_owned()).or_insert(0) += memory_mb;
        CapacityGuard {
            tracker: self.clone(),
            group: group.to_owned(),
            memory_mb,
        }
    }

    /// Current totals of every group seen and not forgotten.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.lock().clone()
    }

    /// Removes the groups in `groups` whose total is still zero.
    pub fn forget_idle<'a>(&self, groups: impl IntoIterator<Item = &'a String>) {
        let mut map = self.lock();
        for g in groups {
            if map.get(g) == Some(&0) {
                map.remove(g);
            }
        }
    }
}

/// Releases a call's memory from its group when dropped (on every path).
#[derive(Debug)]
pub struct CapacityGuard {
    tracker: CapacityTracker,
    group: String,
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
}
