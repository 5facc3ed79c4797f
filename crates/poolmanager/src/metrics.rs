//! The npm's Prometheus metric families, registered into the registry `main` passes to
//! [`ControlLoop::new`](crate::ControlLoop::new).
//!
//! Owns the families; the control loop updates them (the gauges once per tick, after the
//! membership is published). Does not own the scrape endpoint (`fn_lifecycle::metrics`).
//! The `lb_group` label comes from the operator's catalog, so its cardinality is bounded by
//! the number of groups; a group the loop no longer knows is removed from the gauges.
//!
//! - `fn_npm_runners{lb_group, state}`: runners by state (`active`, `draining`).
//! - `fn_npm_wanted_mb{lb_group}`: the demand the live LBs advertise.
//! - `fn_npm_lbs{lb_group}`: live LBs advertising for the group.
//! - `fn_npm_provisions_total{result}`: runners provisioned (`ok`), or asked for in a
//!   provisioning request that failed (`failed`).
//! - `fn_npm_removals_total`: drained runners removed.
//! - `fn_npm_lbs_purged_total`: LBs forgotten after going silent.

use std::collections::BTreeSet;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GroupState {
    lb_group: String,
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Group {
    lb_group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// One group's figures at the end of a tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GroupFigures {
    pub active: usize,
    pub draining: usize,
    pub wanted_mb: u64,
    pub lbs: usize,
}

/// The npm's metric families.
#[derive(Debug)]
pub struct NpmMetrics {
    runners: Family<GroupState, Gauge>,
    wanted_mb: Family<Group, Gauge>,
    lbs: Family<Group, Gauge>,
    provisions: Family<ResultLabel, Counter>,
    removals: Counter,
    lbs_purged: Counter,
    /// Groups shown in the gauges, to remove the ones that go away. Only the control loop
    /// writes; a `Mutex` keeps the type `Sync` without making the loop's methods `&mut`.
    shown: Mutex<BTreeSet<String>>,
}

/// Gauge value of a count (saturating; counts never come near `i64::MAX`).
fn gauge_value<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl NpmMetrics {
    /// Creates the families and registers them in `registry` (once per registry).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = NpmMetrics {
            runners: Family::default(),
            wanted_mb: Family::default(),
            lbs: Family::default(),
            provisions: Family::default(),
            removals: Counter::default(),
            lbs_purged: Counter::default(),
            shown: Mutex::new(BTreeSet::new()),
        };
        registry.register(
            "fn_npm_runners",
            "Runners per LB group, by state (active, draining)",
            metrics.runners.clone(),
        );
        registry.register(
            "fn_npm_wanted_mb",
            "Memory the live LBs ask for per LB group, in MB",
            metrics.wanted_mb.clone(),
        );
        registry.register(
            "fn_npm_lbs",
            "Live LBs advertising demand for the LB group",
            metrics.lbs.clone(),
        );
        registry.register(
            "fn_npm_provisions",
            "Runners provisioned (ok), or asked for in a failed provisioning request (failed)",
            metrics.provisions.clone(),
        );
        registry.register(
            "fn_npm_removals",
            "Drained runners removed",
            metrics.removals.clone(),
        );
        registry.register(
            "fn_npm_lbs_purged",
            "LBs forgotten after going silent",
            metrics.lbs_purged.clone(),
        );
        metrics
    }

    pub(crate) fn provisioned(&self, runners: usize) {
        self.provision_result("ok", runners);
    }

    pub(crate) fn provisioning_failed(&self, runners: usize) {
        self.provision_result("failed", runners);
    }

    fn provision_result(&self, result: &'static str, runners: usize) {
        self.provisions
            .get_or_create(&ResultLabel { result })
            .inc_by(runners as u64);
    }

    pub(crate) fn removed(&self) {
        self.removals.inc();
    }

    pub(crate) fn purged(&self, lbs: usize) {
        self.lbs_purged.inc_by(lbs as u64);
    }

    /// Sets the gauges to this tick's figures; groups not in `groups` any more are removed.
    pub(crate) fn show(&self, groups: impl IntoIterator<Item = (String, GroupFigures)>) {
        let mut shown = self
            .shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut now_shown = BTreeSet::new();
        for (group, figures) in groups {
            for (state, count) in [("active", figures.active), ("draining", figures.draining)] {
                self.runners
                    .get_or_create(&GroupState {
                        lb_group: group.clone(),
                        state,
                    })
                    .set(gauge_value(count));
            }
            let label = Group {
                lb_group: group.clone(),
            };
            self.wanted_mb
                .get_or_create(&label)
                .set(gauge_value(figures.wanted_mb));
            self.lbs.get_or_create(&label).set(gauge_value(figures.lbs));
            now_shown.insert(group);
        }
        for gone in shown.difference(&now_shown) {
            for state in ["active", "draining"] {
                self.runners.remove(&GroupState {
                    lb_group: gone.clone(),
                    state,
                });
            }
            let label = Group {
                lb_group: gone.clone(),
            };
            self.wanted_mb.remove(&label);
            self.lbs.remove(&label);
        }
        *shown = now_shown;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_that_go_away_leave_the_gauges() {
        let mut registry = Registry::default();
        let metrics = NpmMetrics::register(&mut registry);
        let figures = GroupFigures {
            active: 2,
            draining: 1,
            wanted_mb: 512,
            lbs: 3,
        };
        metrics.show([("a".to_owned(), figures), ("b".to_owned(), figures)]);
        let text = fn_lifecycle::metrics::encode(&registry).expect("encodes");
        for line in [
            "fn_npm_runners{lb_group=\"a\",state=\"active\"} 2\n",
            "fn_npm_runners{lb_group=\"b\",state=\"draining\"} 1\n",
            "fn_npm_wanted_mb{lb_group=\"a\"} 512\n",
            "fn_npm_lbs{lb_group=\"b\"} 3\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        metrics.show([("a".to_owned(), figures)]);
        let text = fn_lifecycle::metrics::encode(&registry).expect("encodes");
        assert!(!text.contains("lb_group=\"b\""), "{text}");
        assert!(text.contains("lb_group=\"a\""), "{text}");
    }
}
