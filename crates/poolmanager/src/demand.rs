//! Demand per LB group: the sum of the latest capacity adverts of every live LB.
//!
//! Each LB reports, per group, the most memory its calls in flight or waiting took at once
//! since its previous advert (a figure held until the next, which the predictor's window
//! then holds for the scale-down delay: one advert interval more than the figure of the
//! moment would, and a busy group under light traffic is not read as idle). The npm keeps
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

/// Most groups live LBs may have demand in at once. Past it, a new name in an advert is
/// left out of it (with a warning): each live group costs every tick and four metric series.
pub const MAX_LIVE_GROUPS: usize = 4096;

/// Most live LBs. An advert from a new LB id past it is refused: ids are input from the
/// network, and one peer sending each advert under a new id would otherwise grow the book
/// (and each tick's work) without bound. Real deployments have a few LBs.
pub const MAX_LBS: usize = 1024;

/// Most figures (one per LB and group it names) all live LBs hold together. [`MAX_LBS`]
/// LBs each naming a full advert's groups would otherwise hold about a million, some
/// hundreds of MB, from one peer sending adverts under fresh ids; 64 LBs naming a whole
/// advert's worth each fit, and real deployments have a few LBs and a handful of groups.
pub const MAX_FIGURES: usize = 64 * fn_protocol::poolmanager::MAX_GROUPS_PER_ADVERT;

/// Why an advert was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertRefused {
    #[error(
        "the npm keeps at most {MAX_LBS} live LBs and has as many; an LB silent for \
         FN_LB_PURGE_AFTER frees its place (does each advert carry a new lb_id?)"
    )]
    TooManyLbs,
    #[error(
        "the npm keeps at most {MAX_FIGURES} group figures from all live LBs together, and \
         this advert's {groups} would pass it; an LB silent for FN_LB_PURGE_AFTER frees its \
         figures (do the LBs each advertise thousands of groups, or adverts carry new lb_ids?)"
    )]
    TooManyFigures { groups: usize },
}

/// What live LBs want of one group, kept up to date as adverts come and LBs go, so that a
/// lookup does not walk every LB.
#[derive(Debug, Clone, Copy, Default)]
struct GroupTotal {
    /// The sum of the LBs' figures: wide enough never to overflow (each is a `u64`, and
    /// there are at most [`MAX_LBS`] of them).
    mb: u128,
    /// Live LBs that name the group.
    lbs: usize,
}

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
    /// Figures the live LBs hold together (the sum of their adverts' groups), at most
    /// [`MAX_FIGURES`].
    figures: usize,
    /// Group → the sum of the live LBs' figures for it (groups no live LB names are left
    /// out).
    totals: BTreeMap<String, GroupTotal>,
    /// Group → when an LB last advertised it.
    advertised: BTreeMap<String, Instant>,
    /// Warns when a new group finds [`MAX_RETAINED_GROUPS`] reached.
    full: Throttle,
    /// Warns when a new group finds [`MAX_LIVE_GROUPS`] reached.
    too_many_live: Throttle,
    /// LBs purged in the last [`RETURN_WINDOW`], to notice one that comes back at once.
    purged: BTreeMap<String, Instant>,
    /// Warns when a purged LB advertises again at once.
    came_back: Throttle,
}

/// An LB purged as silent that advertises again within this was not dead: its adverts come
/// further apart than the purge interval allows.
const RETURN_WINDOW: Duration = Duration::from_secs(60);

impl Default for DemandBook {
    fn default() -> Self {
        DemandBook {
            lbs: BTreeMap::new(),
            figures: 0,
            totals: BTreeMap::new(),
            advertised: BTreeMap::new(),
            full: Throttle::new(Duration::from_secs(60)),
            too_many_live: Throttle::new(Duration::from_secs(60)),
            purged: BTreeMap::new(),
            came_back: Throttle::new(Duration::from_secs(60)),
        }
    }
}

impl DemandBook {
    /// Records an advert from `lb_id`: it replaces that LB's previous figures.
    ///
    /// # Errors
    /// [`AdvertRefused::TooManyLbs`] for a new LB when [`MAX_LBS`] are live, and
    /// [`AdvertRefused::TooManyFigures`] when the advert would take the live LBs' figures
    /// past [`MAX_FIGURES`]. A refused advert changes nothing: the LB's previous figures
    /// stand until it is purged.
    pub fn record(
        &mut self,
        lb_id: &str,
        groups: impl IntoIterator<Item = (String, u64)>,
        now: Instant,
    ) -> Result<(), AdvertRefused> {
        let held = self.lbs.get(lb_id).map(|a| a.groups.len());
        if held.is_none() && self.lbs.len() >= MAX_LBS {
            return Err(AdvertRefused::TooManyLbs);
        }
        // A group named twice in one advert: the last figure stands.
        let groups: BTreeMap<String, u64> = groups.into_iter().collect();
        if self.figures.saturating_sub(held.unwrap_or(0)) + groups.len() > MAX_FIGURES {
            return Err(AdvertRefused::TooManyFigures {
                groups: groups.len(),
            });
        }
        let previous = self.lbs.remove(lb_id);
        if previous.is_none() {
            match self.purged.remove(lb_id) {
                Some(purged) => fn_lifecycle::warn_throttled!(
                    self.came_back,
                    lb_id,
                    back_after = ?now.saturating_duration_since(purged),
                    "an LB purged as silent advertises again: its adverts come further apart \
                     than FN_LB_PURGE_AFTER allows (keep the LBs' FN_ADVERTISE_INTERVAL well \
                     under it), and its demand comes and goes"
                ),
                None => tracing::info!(lb_id, "new LB advertising capacity"),
            }
        }
        if let Some(previous) = &previous {
            self.subtract(&previous.groups);
        }
        let mut figures = BTreeMap::new();
        for (group, mb) in groups {
            if !self.totals.contains_key(&group) && self.totals.len() >= MAX_LIVE_GROUPS {
                fn_lifecycle::warn_throttled!(
                    self.too_many_live,
                    lb_id,
                    %group,
                    max = MAX_LIVE_GROUPS,
                    "too many LB groups with demand; this one's is left out"
                );
                continue;
            }
            let total = self.totals.entry(group.clone()).or_default();
            total.lbs += 1;
            total.mb += u128::from(mb);
            figures.insert(group, mb);
        }
        self.figures += figures.len();
        let names: Vec<String> = figures.keys().cloned().collect();
        self.lbs.insert(
            lb_id.to_owned(),
            LbAdvert {
                last_seen: now,
                groups: figures,
            },
        );
        self.retain_groups(names, now);
        Ok(())
    }

    /// Takes an LB's figures out of the totals.
    fn subtract(&mut self, groups: &BTreeMap<String, u64>) {
        self.figures = self.figures.saturating_sub(groups.len());
        for (group, mb) in groups {
            if let Some(total) = self.totals.get_mut(group) {
                total.mb = total.mb.saturating_sub(u128::from(*mb));
                total.lbs = total.lbs.saturating_sub(1);
                if total.lbs == 0 {
                    self.totals.remove(group);
                }
            }
        }
    }

    /// Retains `groups` as if advertised at `now` (a restarted npm does so for the groups of
    /// the runners it finds, adopted or held out).
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

    /// Forgets the LB `lb_id`, which said it is leaving (its last advert), with its demand;
    /// unlike a purge, nothing to warn of. Returns whether it was known.
    pub fn leave(&mut self, lb_id: &str) -> bool {
        let Some(advert) = self.lbs.remove(lb_id) else {
            return false;
        };
        self.subtract(&advert.groups);
        tracing::info!(lb_id, "an LB left (its last advert); its demand is dropped");
        true
    }

    /// Forgets LBs not heard from for `purge_after`; returns their ids.
    pub fn purge(&mut self, now: Instant, purge_after: Duration) -> Vec<String> {
        let silent: Vec<(String, Duration)> = self
            .lbs
            .iter()
            .map(|(id, a)| (id, now.saturating_duration_since(a.last_seen)))
            .filter(|(_, silent_for)| *silent_for > purge_after)
            .map(|(id, silent_for)| (id.clone(), silent_for))
            .collect();
        self.purged
            .retain(|_, at| now.saturating_duration_since(*at) <= RETURN_WINDOW);
        for (id, silent_for) in &silent {
            if let Some(advert) = self.lbs.remove(id) {
                self.subtract(&advert.groups);
            }
            if self.purged.len() < MAX_LBS {
                self.purged.insert(id.clone(), now);
            }
            tracing::warn!(
                lb_id = %id,
                ?silent_for,
                ?purge_after,
                "purged an LB that stopped advertising; its demand is dropped"
            );
        }
        silent.into_iter().map(|(id, _)| id).collect()
    }

    /// Total MB wanted by all live LBs for `group`.
    pub fn wanted_mb(&self, group: &str) -> u64 {
        // Saturating: adverts are input from the network, and two LBs claiming u64::MAX
        // must not wrap to little demand.
        self.totals
            .get(group)
            .map_or(0, |t| u64::try_from(t.mb).unwrap_or(u64::MAX))
    }

    /// Every group some live LB has mentioned.
    pub fn groups(&self) -> impl Iterator<Item = &String> {
        self.totals.keys()
    }

    /// Number of live LBs advertising for `group`.
    pub fn lbs_in(&self, group: &str) -> usize {
        self.totals.get(group).map_or(0, |t| t.lbs)
    }

    /// Number of live LBs.
    pub fn lb_count(&self) -> usize {
        self.lbs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fn_protocol::poolmanager::MAX_GROUPS_PER_ADVERT;

    #[test]
    fn an_lb_that_leaves_takes_its_demand_and_is_no_purge() {
        let mut book = DemandBook::default();
        let now = Instant::now();
        book.record("lb1", [("g".into(), 3)], now)
            .expect("recorded");
        book.record("lb2", [("g".into(), 2)], now)
            .expect("recorded");
        assert!(book.leave("lb1"));
        assert_eq!(book.wanted_mb("g"), 2, "lb1's demand left with it");
        assert!(!book.leave("lb1"), "once");
        // Nothing left to purge for it later, and it is no purged LB coming back.
        assert_eq!(
            book.purge(now + Duration::from_secs(10), Duration::from_secs(5)),
            ["lb2"]
        );
        assert!(!book.purged.contains_key("lb1"));
    }

    #[test]
    fn live_groups_are_capped_and_totals_follow_adverts_and_purges() {
        let mut book = DemandBook::default();
        let now = Instant::now();
        let many = (0..MAX_LIVE_GROUPS).map(|i| (format!("g{i}"), 1));
        book.record("lb1", many, now).expect("recorded");
        book.record("lb2", [("g0".into(), 2), ("new".into(), 5)], now)
            .expect("recorded");
        assert_eq!(book.wanted_mb("g0"), 3);
        assert_eq!(book.lbs_in("g0"), 2);
        assert_eq!(
            book.wanted_mb("new"),
            0,
            "past the cap, a new name is left out"
        );
        assert_eq!(book.groups().count(), MAX_LIVE_GROUPS);
        // lb1's next advert names fewer groups: room for the new one.
        book.record("lb1", [("g0".into(), 1)], now)
            .expect("recorded");
        assert_eq!(book.groups().count(), 1);
        book.record("lb2", [("g0".into(), 2), ("new".into(), 5)], now)
            .expect("recorded");
        assert_eq!(book.wanted_mb("new"), 5);
        assert_eq!(
            book.purge(now + Duration::from_secs(10), Duration::from_secs(5))
                .len(),
            2
        );
        assert_eq!(
            book.groups().count(),
            0,
            "a purged LB's figures leave the totals"
        );
        assert_eq!(book.wanted_mb("g0"), 0);
    }

    #[test]
    fn the_live_lbs_figures_are_bounded_together_and_a_refused_advert_changes_nothing() {
        let mut book = DemandBook::default();
        let now = Instant::now();
        let full = || (0..MAX_GROUPS_PER_ADVERT).map(|i| (format!("g{i}"), 1));
        let lbs = MAX_FIGURES / MAX_GROUPS_PER_ADVERT;
        for lb in 0..lbs {
            book.record(&format!("lb{lb}"), full(), now)
                .expect("within the bound");
        }
        assert_eq!(book.figures, MAX_FIGURES);
        let refused = book
            .record("one-more", [("g0".into(), 7)], now)
            .expect_err("past the bound");
        assert_eq!(refused, AdvertRefused::TooManyFigures { groups: 1 });
        assert!(
            refused.to_string().contains("FN_LB_PURGE_AFTER"),
            "{refused}"
        );
        assert_eq!(book.lb_count(), lbs, "the refused LB is not taken in");
        assert_eq!(book.wanted_mb("g0"), lbs as u64, "nor its figure");
        // A live LB may keep advertising as many groups as it holds, or fewer.
        book.record("lb0", full(), now)
            .expect("its own figures replaced");
        book.record("lb0", [("g0".into(), 1)], now).expect("fewer");
        assert_eq!(book.figures, MAX_FIGURES - MAX_GROUPS_PER_ADVERT + 1);
        book.record("one-more", [("g0".into(), 7)], now)
            .expect("room again");
        // An LB that leaves or is purged frees its figures.
        assert!(book.leave("lb1"));
        assert_eq!(book.figures, MAX_FIGURES - 2 * MAX_GROUPS_PER_ADVERT + 2);
        book.purge(now + Duration::from_secs(10), Duration::from_secs(5));
        assert_eq!(book.figures, 0);
        assert_eq!(book.groups().count(), 0);
    }

    #[test]
    fn a_group_named_twice_in_one_advert_counts_once_with_its_last_figure() {
        let mut book = DemandBook::default();
        let now = Instant::now();
        book.record("lb1", [("g".into(), 3), ("g".into(), 5)], now)
            .expect("recorded");
        assert_eq!(
            (book.wanted_mb("g"), book.lbs_in("g"), book.figures),
            (5, 1, 1)
        );
    }

    #[test]
    fn huge_adverts_saturate_instead_of_overflowing() {
        let mut book = DemandBook::default();
        let now = Instant::now();
        book.record("lb1", [("g".into(), u64::MAX)], now)
            .expect("recorded");
        book.record("lb2", [("g".into(), u64::MAX)], now)
            .expect("recorded");
        assert_eq!(book.wanted_mb("g"), u64::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn sums_live_lbs_and_purges_silent_ones() {
        let mut book = DemandBook::default();
        let t0 = Instant::now();
        book.record("lb1", [("g".into(), 256)], t0)
            .expect("recorded");
        book.record("lb2", [("g".into(), 128), ("h".into(), 64)], t0)
            .expect("recorded");
        assert_eq!(book.wanted_mb("g"), 384);
        assert_eq!(book.wanted_mb("h"), 64);
        assert_eq!((book.lbs_in("g"), book.lbs_in("h")), (2, 1));
        // lb1 keeps advertising, lb2 goes silent.
        book.record("lb1", [("g".into(), 512)], t0 + Duration::from_secs(4))
            .expect("recorded");
        let purged = book.purge(t0 + Duration::from_secs(6), Duration::from_secs(5));
        assert_eq!(purged, vec!["lb2".to_string()]);
        assert!(
            book.purged.contains_key("lb2"),
            "remembered, to notice it coming back"
        );
        assert_eq!(book.wanted_mb("g"), 512);
        assert_eq!(book.wanted_mb("h"), 0);
        assert_eq!(book.lb_count(), 1);
        // It comes back (its adverts were further apart than the purge interval): taken in
        // again, and no longer remembered as purged; one purged long ago is forgotten.
        book.record("lb2", [("h".into(), 64)], t0 + Duration::from_secs(7))
            .expect("recorded");
        assert!(!book.purged.contains_key("lb2"));
        assert_eq!(book.wanted_mb("h"), 64);
        book.purge(t0 + Duration::from_secs(20), Duration::from_secs(5));
        assert_eq!(book.purged.len(), 2);
        book.purge(t0 + Duration::from_secs(100), Duration::from_secs(5));
        assert!(book.purged.is_empty(), "{:?}", book.purged);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_is_retained_until_no_lb_advertised_it_for_the_retention() {
        let mut book = DemandBook::default();
        let t0 = Instant::now();
        let retention = Duration::from_secs(60);
        book.record("lb1", [("g".into(), 0), ("h".into(), 64)], t0)
            .expect("recorded");
        book.record("lb1", [("h".into(), 64)], t0 + Duration::from_secs(50))
            .expect("recorded");
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
        book.record("lb2", [("late".into(), 64)], t0)
            .expect("recorded");
        assert!(!book.is_retained("late"));
        assert_eq!(book.wanted_mb("late"), 64);
        assert_eq!(book.retained_groups().count(), MAX_RETAINED_GROUPS);
    }
}
