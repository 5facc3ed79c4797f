//! Demand per LB group: the sum of the latest capacity adverts of every live LB.
//!
//! Each LB reports, per group, the memory of its calls in flight or waiting. The npm keeps
//! the latest figure of each LB with the time it arrived; an LB silent for longer than the
//! purge interval is forgotten (it crashed or was partitioned away), and its demand with it.
//!
//! It also keeps when each group was last advertised (at zero too): a group is *retained*
//! for the group retention after that, and only a retained group (or `default`) keeps
//! `FN_MIN_RUNNERS` without demand. An LB advertises a group only while it has calls for it,
//! so a group that went idle is still retained; one no LB has named for the retention (a
//! group taken out of the catalog, a name an LB sent by mistake) is forgotten, with its
//! runners and figures, instead of being kept for ever.

use std::collections::BTreeMap;
use std::time::Duration;

use fn_lifecycle::logging::Throttle;
use tokio::time::Instant;

/// Most groups retained at once. Past it a new group's demand still counts while LBs
/// advertise it, but it is not retained (no `FN_MIN_RUNNERS` for it); real deployments have
/// a handful of groups, and names are input from the network.
pub const MAX_RETAINED_GROUPS: usize = 4096;

/// One LB's latest advert.
#[derive(Debug, Clone)]
struct LbAdvert {
    last_seen: Instant,
    /// Group → MB.
    groups: BTreeMap<String, u64>,
}

/// Latest adverts of all live LBs, and when each group was last advertised.
#[derive(Debug)]
pub struct DemandBook {
    lbs: BTreeMap<String, LbAdvert>,
    /// Group → when an LB last advertised it.
    advertised: BTreeMap<String, Instant>,
    /// Warns when a new group finds [`MAX_RETAINED_GROUPS`] reached.
    full: Throttle,
}

impl Default for DemandBook {
    fn default() -> Self {
        DemandBook {
            lbs: BTreeMap::new(),
            advertised: BTreeMap::new(),
            full: Throttle::new(Duration::from_secs(60)),
        }
    }
}

impl DemandBook {
    /// Records an advert from `lb_id`: it replaces that LB's previous figures.
    pub fn record(
        &mut self,
        lb_id: &str,
        groups: impl IntoIterator<Item = (String, u64)>,
        now: Instant,
    ) {
        let advert = self.lbs.entry(lb_id.to_owned()).or_insert_with(|| {
            tracing::info!(lb_id, "new LB advertising capacity");
            LbAdvert {
                last_seen: now,
                groups: BTreeMap::new(),
            }
        });
        advert.last_seen = now;
        advert.groups = groups.into_iter().collect();
        let names: Vec<String> = advert.groups.keys().cloned().collect();
        self.retain_groups(names, now);
    }

    /// Retains `groups` as if advertised at `now` (a restarted npm does so for the groups of
    /// the runners it adopts).
    pub fn retain_groups(&mut self, groups: impl IntoIterator<Item = String>, now: Instant) {
        for group in groups {
            if let Some(seen) = self.advertised.get_mut(&group) {
                *seen = (*seen).max(now);
            } else if self.advertised.len() < MAX_RETAINED_GROUPS {
                self.advertised.insert(group, now);
            } else {
                fn_lifecycle::warn_throttled!(
                    self.full,
                    group,
                    max = MAX_RETAINED_GROUPS,
                    "too many LB groups to retain; this one keeps no FN_MIN_RUNNERS"
                );
            }
        }
    }

    /// Forgets groups no LB advertised for `retention`; returns them.
    pub fn forget_groups(&mut self, now: Instant, retention: Duration) -> Vec<String> {
        let stale: Vec<String> = self
            .advertised
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) > retention)
            .map(|(group, _)| group.clone())
            .collect();
        for group in &stale {
            self.advertised.remove(group);
        }
        stale
    }

    /// Whether an LB advertised `group` within the retention.
    pub fn is_retained(&self, group: &str) -> bool {
        self.advertised.contains_key(group)
    }

    /// The groups an LB advertised within the retention.
    pub fn retained_groups(&self) -> impl Iterator<Item = &String> {
        self.advertised.keys()
    }

    /// Treats every LB as heard from at `now`. For when the npm itself was not running for a
    /// while (stopped, starved of CPU): the LBs' silence was the npm's, not theirs, and
    /// purging them would drop the whole demand and drain runners under load. An LB that
    /// really died in the meantime is purged one purge interval later.
    pub fn forgive_silence(&mut self, now: Instant) {
        for advert in self.lbs.values_mut() {
            advert.last_seen = advert.last_seen.max(now);
        }
        for seen in self.advertised.values_mut() {
            *seen = (*seen).max(now);
        }
    }

    /// Forgets LBs not heard from for `purge_after`; returns their ids.
    pub fn purge(&mut self, now: Instant, purge_after: Duration) -> Vec<String> {
        let silent: Vec<String> = self
            .lbs
            .iter()
            .filter(|(_, a)| now.duration_since(a.last_seen) > purge_after)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &silent {
            self.lbs.remove(id);
            tracing::warn!(lb_id = %id, silent_for = ?purge_after, "purged an LB that stopped advertising; its demand is dropped");
        }
        silent
    }

    /// Total MB wanted by all live LBs for `group`.
    pub fn wanted_mb(&self, group: &str) -> u64 {
        // Saturating: adverts are input from the network, and two LBs claiming u64::MAX
        // must not overflow (a panic in debug builds, a wrap to little demand in release).
        self.lbs
            .values()
            .filter_map(|a| a.groups.get(group))
            .fold(0, |total: u64, mb| total.saturating_add(*mb))
    }

    /// Every group some live LB has mentioned.
    pub fn groups(&self) -> impl Iterator<Item = &String> {
        self.lbs.values().flat_map(|a| a.groups.keys())
    }

    /// Number of live LBs advertising for `group`.
    pub fn lbs_in(&self, group: &str) -> usize {
        self.lbs
            .values()
            .filter(|a| a.groups.contains_key(group))
            .count()
    }

    /// Number of live LBs.
    pub fn lb_count(&self) -> usize {
        self.lbs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_adverts_saturate_instead_of_overflowing() {
        let mut book = DemandBook::default();
        let now = Instant::now();
        book.record("lb1", [("g".into(), u64::MAX)], now);
        book.record("lb2", [("g".into(), u64::MAX)], now);
        assert_eq!(book.wanted_mb("g"), u64::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn sums_live_lbs_and_purges_silent_ones() {
        let mut book = DemandBook::default();
        let t0 = Instant::now();
        book.record("lb1", [("g".into(), 256)], t0);
        book.record("lb2", [("g".into(), 128), ("h".into(), 64)], t0);
        assert_eq!(book.wanted_mb("g"), 384);
        assert_eq!(book.wanted_mb("h"), 64);
        assert_eq!((book.lbs_in("g"), book.lbs_in("h")), (2, 1));
        // lb1 keeps advertising, lb2 goes silent.
        book.record("lb1", [("g".into(), 512)], t0 + Duration::from_secs(4));
        let purged = book.purge(t0 + Duration::from_secs(6), Duration::from_secs(5));
        assert_eq!(purged, vec!["lb2".to_string()]);
        assert_eq!(book.wanted_mb("g"), 512);
        assert_eq!(book.wanted_mb("h"), 0);
        assert_eq!(book.lb_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_is_retained_until_no_lb_advertised_it_for_the_retention() {
        let mut book = DemandBook::default();
        let t0 = Instant::now();
        let retention = Duration::from_secs(60);
        book.record("lb1", [("g".into(), 0), ("h".into(), 64)], t0);
        book.record("lb1", [("h".into(), 64)], t0 + Duration::from_secs(50));
        assert!(
            book.forget_groups(t0 + Duration::from_secs(60), retention)
                .is_empty()
        );
        assert_eq!(
            book.forget_groups(t0 + Duration::from_secs(61), retention),
            ["g"]
        );
        assert!(!book.is_retained("g") && book.is_retained("h"));
        // The cap: a new name past it counts its demand but is not retained.
        let names = (0..MAX_RETAINED_GROUPS).map(|i| format!("x{i}"));
        book.retain_groups(names, t0);
        book.record("lb2", [("late".into(), 64)], t0);
        assert!(!book.is_retained("late"));
        assert_eq!(book.wanted_mb("late"), 64);
        assert_eq!(book.retained_groups().count(), MAX_RETAINED_GROUPS);
    }
}
