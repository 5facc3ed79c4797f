//! [`PublishedOrder`]: the order in which each LB group's runners are published to the LBs.
//!
//! The LBs' `ch` and `warm` placers map a function onto an *index* of the group's list with
//! jump consistent hash (see `fn_placement::ConsistentHashPlacer`), which keeps every key in
//! place when a runner is appended or when the *last* one goes, and no other change. So the
//! npm does not derive the list from its runner table each time (oldest first: a runner
//! leaving from the middle shifted every later index, and a rolling restart or the crash of
//! an old runner re-homed nearly every function at once), but keeps it as state of its own:
//!
//! - a runner that joins the group's active runners is appended;
//! - a runner that leaves is replaced by the group's last runner (a swap-remove); the last
//!   runner itself, or several from the end, just go.
//!
//! By jump hash's monotonicity only the functions of the leaving runner and those of the
//! moved last runner change home: about `2/n` of them, spread evenly over the rest, with no
//! hole left (a placeholder that refuses would pile the hole's functions on the next runner
//! of the walk). The order is the same for every LB (one npm publishes it) and follows from
//! the sequence of changes alone. It is not persisted: an npm that restarts publishes its
//! runners oldest first, which reorders the lists once.
//!
//! What this module does not own: which runners are active (the control loop's state
//! machine) and the publication itself ([`crate::manager::Shared`]).

use std::collections::{HashMap, HashSet};

/// Each group's runner ids in the order the LBs get them. Owned by the control loop.
#[derive(Debug, Default)]
pub struct PublishedOrder {
    groups: HashMap<String, Vec<String>>,
}

impl PublishedOrder {
    /// Brings `group`'s order up to date with its active runners `members` (given oldest
    /// first, so that runners joining together are appended in a deterministic order) and
    /// returns it: runners no longer among `members` leave by swap-remove, new ones are
    /// appended. A group with no members is forgotten.
    pub fn update<'a>(
        &mut self,
        group: &str,
        members: impl IntoIterator<Item = &'a str>,
    ) -> &[String] {
        let members: Vec<&str> = members.into_iter().collect();
        if members.is_empty() {
            self.groups.remove(group);
            return &[];
        }
        let order = self.groups.entry(group.to_owned()).or_default();
        rearrange(order, &members);
        order
    }

    /// Forgets the groups `keep` says no to (those without active runners).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.groups.retain(|group, _| keep(group));
    }
}

/// Makes `order` hold exactly `members`: each id of `order` not among them is replaced by
/// the last id that stays (trailing leavers just go), then each member not yet in `order`
/// is appended in the order of `members`.
fn rearrange(order: &mut Vec<String>, members: &[&str]) {
    let staying: HashSet<&str> = members.iter().copied().collect();
    let mut i = 0;
    while i < order.len() {
        if staying.contains(order[i].as_str()) {
            i += 1;
            continue;
        }
        // Leavers at the end go without moving anyone; then the last that stays fills the
        // hole at `i` (or `i` was itself the end).
        while order
            .last()
            .is_some_and(|id| !staying.contains(id.as_str()))
        {
            order.pop();
        }
        if i < order.len() {
            order.swap_remove(i);
        }
    }
    let listed: HashSet<String> = order.iter().cloned().collect();
    order.extend(
        members
            .iter()
            .filter(|id| !listed.contains(**id))
            .map(|id| (*id).to_owned()),
    );
}

#[cfg(test)]
mod tests {
    use fn_placement::{ConsistentHashPlacer, PlacementKey, Placer};

    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("r{i}")).collect()
    }

    fn update(order: &mut PublishedOrder, members: &[String]) -> Vec<String> {
        order
            .update("g", members.iter().map(String::as_str))
            .to_vec()
    }

    #[test]
    fn a_runner_leaving_from_the_middle_gets_the_last_in_its_place() {
        let mut order = PublishedOrder::default();
        let all = ids(5);
        assert_eq!(update(&mut order, &all), all, "first publication: as given");
        let without_r1: Vec<String> = all.iter().filter(|id| *id != "r1").cloned().collect();
        assert_eq!(update(&mut order, &without_r1), ["r0", "r4", "r2", "r3"]);
        // The same members again change nothing: the order is the npm's state, not a sort.
        assert_eq!(update(&mut order, &without_r1), ["r0", "r4", "r2", "r3"]);
        // A runner that joins is appended, even one older than the rest (r1 serving again).
        assert_eq!(update(&mut order, &all), ["r0", "r4", "r2", "r3", "r1"]);
    }

    #[test]
    fn the_last_runner_leaving_moves_no_one() {
        let mut order = PublishedOrder::default();
        update(&mut order, &ids(4));
        assert_eq!(update(&mut order, &ids(3)), ["r0", "r1", "r2"]);
    }

    #[test]
    fn several_leaving_at_once_are_filled_from_the_end_by_runners_that_stay() {
        let mut order = PublishedOrder::default();
        update(&mut order, &ids(8));
        // r1 and r3 leave, and so do r6 and r7 at the end: r5 and r4 fill the holes.
        let staying: Vec<String> = ["r0", "r2", "r4", "r5"].map(String::from).to_vec();
        assert_eq!(update(&mut order, &staying), ["r0", "r5", "r2", "r4"]);
        // r0 leaves as r9 joins: r4 fills r0's place, r9 goes to the end.
        let next: Vec<String> = ["r2", "r4", "r5", "r9"].map(String::from).to_vec();
        assert_eq!(update(&mut order, &next), ["r4", "r5", "r2", "r9"]);
    }

    #[test]
    fn a_group_without_members_is_forgotten_and_starts_again_as_given() {
        let mut order = PublishedOrder::default();
        update(&mut order, &ids(3));
        update(&mut order, &["r0".to_owned(), "r2".to_owned()]);
        assert!(update(&mut order, &[]).is_empty());
        assert_eq!(update(&mut order, &ids(3)), ids(3));
    }

    /// The share of `keys` whose first runner under the real `ch` placer differs between
    /// the lists `before` and `after`.
    fn moved_share(keys: &[PlacementKey], before: &[String], after: &[String]) -> f64 {
        let placer = ConsistentHashPlacer::new();
        let home = |key: &PlacementKey, list: &[String]| {
            let first = placer
                .order(key, list.len())
                .next()
                .expect("a non-empty list");
            list[first].clone()
        };
        let moved = keys
            .iter()
            .filter(|key| home(key, before) != home(key, after))
            .count();
        moved as f64 / keys.len() as f64
    }

    /// A runner leaving from the middle of a group of `n` re-homes about `2/n` of the
    /// functions (its own and the last runner's), not every function past it.
    #[test]
    fn a_runner_leaving_from_the_middle_moves_about_two_nths_of_the_functions() {
        let keys: Vec<PlacementKey> = (0..20_000)
            .map(|i| PlacementKey::new("app", format!("f{i}")))
            .collect();
        let n = 10;
        for leaving in [0, 5, 9] {
            let mut order = PublishedOrder::default();
            let before = update(&mut order, &ids(n));
            let gone = format!("r{leaving}");
            let staying: Vec<String> = ids(n).into_iter().filter(|id| *id != gone).collect();
            let after = update(&mut order, &staying);
            let moved = moved_share(&keys, &before, &after);
            assert!(
                moved < 2.5 / n as f64,
                "runner {leaving} of {n} leaving moved {:.1}% of the functions",
                moved * 100.0
            );
            // At least the leaving runner's own share had to move.
            assert!(moved > 0.5 / n as f64, "{moved}");
        }
    }
}
