//! The npm's own clock for how long a runner task has waited for a node (see
//! [`super::unplaced`]): the instant this npm first listed each task Swarm means to run and
//! has given to no node yet, kept while the task waits and forgotten once it is placed or
//! gone. A task's creation time is the manager's clock: against the npm's, a skewed clock
//! made every new task look old at once (the npm ahead), and so not coming up, or never
//! old (the npm behind).
//!
//! In memory only: a restarted npm times the tasks it finds waiting from its own first list,
//! so a task already waiting gets the whole bound again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bollard::models::Task;
use tokio::time::Instant;

use super::waiting_for_node;

/// How long each task of one service that waits for a node has waited, by this npm's clock,
/// by task id.
#[derive(Debug, Default)]
pub(super) struct Waits(HashMap<String, Duration>);

impl Waits {
    /// How long `task` has waited for a node; `None` for one not waiting, or without an id.
    pub(super) fn of(&self, task: &Task) -> Option<Duration> {
        self.0.get(task.id.as_deref()?).copied()
    }
}

#[cfg(test)]
impl FromIterator<(String, Duration)> for Waits {
    fn from_iter<I: IntoIterator<Item = (String, Duration)>>(iter: I) -> Self {
        Waits(iter.into_iter().collect())
    }
}

/// When this npm first saw each waiting task, and when it asked for the services it made.
#[derive(Debug, Default)]
pub(super) struct Sightings {
    /// Tasks Swarm means to run that no node has taken (see [`waiting_for_node`]), by id.
    first_seen: HashMap<String, Sighting>,
    /// Runner services this npm asked for and has listed no task of yet, by name: when it
    /// asked. Their first task cannot be older than the request, so it is timed from it, as
    /// its creation would be: a provisioning's checks start after the service is made, and
    /// timed from their first sight it would reach the bound only after the plane's start
    /// timeout (the same length) had ended the provisioning for another reason.
    asked: HashMap<String, Instant>,
}

/// A waiting task's first sight.
#[derive(Debug, Clone, Copy)]
struct Sighting {
    /// What its wait is timed from: when this npm first listed it, or asked for its service.
    since: Instant,
    /// When it was noted: a listing that began before may not have it, and does not forget it.
    noted: Instant,
}

impl Sightings {
    /// Notes that this npm asks, at `at`, for runner service `service` (its name).
    pub(super) fn asking(&mut self, service: &str, at: Instant) {
        self.asked.insert(service.to_owned(), at);
    }

    /// Forgets the request for service `service` (it is being removed).
    pub(super) fn forget_service(&mut self, service: &str) {
        self.asked.remove(service);
    }

    /// How long each of `tasks`, those of service `service` in one listing, that waits for a
    /// node has waited at `now`: since this npm first saw it (or asked for the service, for
    /// its first tasks). Those no longer waiting are forgotten.
    pub(super) fn waits(&mut self, service: &str, tasks: &[Task], now: Instant) -> Waits {
        let asked = if tasks.is_empty() {
            None
        } else {
            self.asked.remove(service)
        };
        let mut waits = HashMap::new();
        for task in tasks {
            let Some(id) = task.id.as_deref() else {
                continue;
            };
            if !waiting_for_node(task) {
                self.first_seen.remove(id);
                continue;
            }
            let first = self
                .first_seen
                .entry(id.to_owned())
                .or_insert_with(|| Sighting {
                    since: asked.unwrap_or(now),
                    noted: now,
                });
            waits.insert(id.to_owned(), now.saturating_duration_since(first.since));
        }
        Waits(waits)
    }

    /// Forgets, after a listing of every runner task and service that `began` then, the
    /// tasks it did not list (Swarm dropped them, or their service went), and requests older
    /// than `bound` for services it did not list either (their creation failed). What was
    /// noted since it began (by a provisioning's own look at its service) stays.
    pub(super) fn forget_gone(
        &mut self,
        tasks: &HashSet<&str>,
        services: &HashSet<&str>,
        began: Instant,
        bound: Duration,
    ) {
        self.first_seen
            .retain(|id, seen| tasks.contains(id.as_str()) || seen.noted >= began);
        self.asked.retain(|name, at| {
            services.contains(name.as_str()) || began.saturating_duration_since(*at) <= bound
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{TaskState, TaskStatus};

    fn task(id: &str, state: TaskState) -> Task {
        Task {
            id: Some(id.to_owned()),
            status: Some(TaskStatus {
                state: Some(state),
                ..TaskStatus::default()
            }),
            desired_state: Some(TaskState::RUNNING),
            ..Task::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_waits_from_its_first_sight_until_it_is_placed_or_gone() {
        let mut seen = Sightings::default();
        let pending = [task("t1", TaskState::PENDING)];
        let first = seen.waits("svc", &pending, Instant::now());
        assert_eq!(first.of(&pending[0]), Some(Duration::ZERO));
        tokio::time::advance(Duration::from_secs(20)).await;
        let later = seen.waits("svc", &pending, Instant::now());
        assert_eq!(later.of(&pending[0]), Some(Duration::from_secs(20)));

        // Placed: forgotten, and not timed.
        let placed = [task("t1", TaskState::ASSIGNED)];
        assert_eq!(
            seen.waits("svc", &placed, Instant::now()).of(&placed[0]),
            None
        );
        assert!(seen.first_seen.is_empty());

        // Gone from a listing of every task: forgotten, unless noted after it began.
        let began = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        seen.waits("svc", &pending, Instant::now());
        let (none, services) = (HashSet::new(), HashSet::from(["svc"]));
        let bound = Duration::from_secs(30);
        seen.forget_gone(&none, &services, began, bound);
        assert!(seen.first_seen.contains_key("t1"), "noted since");
        tokio::time::advance(Duration::from_secs(1)).await;
        seen.forget_gone(&none, &services, Instant::now(), bound);
        assert!(seen.first_seen.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_task_of_a_service_the_npm_asked_for_waits_from_the_request() {
        let mut seen = Sightings::default();
        seen.asking("svc", Instant::now());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            seen.waits("svc", &[], Instant::now()).0.len(),
            0,
            "no task yet"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let first = [task("t1", TaskState::PENDING)];
        let waits = seen.waits("svc", &first, Instant::now());
        assert_eq!(waits.of(&first[0]), Some(Duration::from_secs(5)));

        // A later task (a replacement) waits from its own first sight.
        tokio::time::advance(Duration::from_secs(10)).await;
        let both = [
            task("t1", TaskState::FAILED),
            task("t2", TaskState::PENDING),
        ];
        let waits = seen.waits("svc", &both, Instant::now());
        assert_eq!(waits.of(&both[1]), Some(Duration::ZERO));

        // A request whose service never shows goes after the bound.
        seen.asking("never", Instant::now());
        let (tasks, services) = (HashSet::from(["t2"]), HashSet::from(["svc"]));
        seen.forget_gone(&tasks, &services, Instant::now(), Duration::from_secs(30));
        assert!(seen.asked.contains_key("never"));
        tokio::time::advance(Duration::from_secs(31)).await;
        seen.forget_gone(&tasks, &services, Instant::now(), Duration::from_secs(30));
        assert!(!seen.asked.contains_key("never"));
        assert!(seen.first_seen.contains_key("t2"));
    }
}
