//! The npm-fed runner pool (`FN_NPM_ADDRESS`): each LB group's runner list as the npm
//! publishes it.
//!
//! A group is polled once the LB has seen a call for it (the first lookup registers it and
//! wakes the poller), then every poll interval. The npm's order is kept, because consistent
//! hashing depends on every LB having the same list. Clients are reused by address, so a
//! runner that stays in the list keeps its connection; a runner that leaves the list is
//! dropped from it, and its connection closes once the calls still streaming on it end.
//! When the npm cannot be reached, the last known list stays in use, and a group that has
//! none says so (see [`RunnerPool::list_trouble`]).
//!
//! The npm also streams a message each time its membership changes (`WatchMembership`),
//! naming the groups whose lists changed: those of them the LB uses are then fetched at once
//! (every group when it names none: the stream's first message, an npm from before the
//! field), up to [`MAX_FETCHES_IN_FLIGHT`] requests together (the last of many groups waits
//! about one round trip, not one per group before it), so a new runner takes calls as soon
//! as the npm publishes it; a group whose fetch failed is asked again at every message,
//! whichever groups it names. While that stream is up and fetching works, polling (of every
//! group) slows to [`WATCHED_POLL_INTERVAL`], a safety net, counted from the last pass over
//! every group however many messages come; without it, or while fetches fail (an npm that
//! has no such RPC, or a broken stream) polling goes on at the configured interval.
//!
//! A catalog reload that no longer names a group forgets it ([`RunnerPool::retain_groups`]):
//! its list, its runners' clients (once the calls still on them end), its signal and its
//! failure are dropped and it is no longer fetched; named again, it is fetched afresh. A
//! call of a forgotten group still placing finds its list empty from its next pass on and
//! fails as a call of a group without runners does, told the catalog no longer names the
//! group; one already running keeps its runner's client to its end.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fn_lifecycle::logging::Throttle;
use fn_lifecycle::retry::Backoff;

use fn_protocol::poolmanager::LbGroupId;
use fn_protocol::poolmanager::runner_manager_client::RunnerManagerClient;
use fn_tls::{TlsMode, WithoutStatusDetails};
use futures::StreamExt as _;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::client::{ClientConfig, RunnerClient};
use crate::pool::{RunnerList, RunnerPool, check_host_port};
use crate::reports::ReportSignal;

/// The poll interval while the npm's membership watch is up.
pub const WATCHED_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Most `GetLBGroup` requests the poller has in flight at once (each group's list is its own
/// request): enough that a pass over many groups takes a few round trips, few enough that an
/// LB does not flood the npm (which bounds each connection's streams) after a change.
pub const MAX_FETCHES_IN_FLIGHT: usize = 16;

/// Most runners of one group the LB takes from the npm's list (the first ones, in the npm's
/// order, so every LB keeps the same). The npm caps all its runners at
/// `FN_MAX_TOTAL_RUNNERS` (100 by default); a longer list is a broken or hostile npm, and
/// each runner costs a client and, once called, a connection.
pub const MAX_RUNNERS_PER_GROUP: usize = 1024;

/// Runner lists fetched from the npm.
#[derive(Debug, Clone)]
pub struct NpmPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Group → its current list. Read on every placement pass; written by the poller.
    lists: RwLock<HashMap<String, RunnerList>>,
    /// Group → what its runners' clients wake: a report of one group's runner wakes no
    /// call waiting in another.
    signals: RwLock<HashMap<String, ReportSignal>>,
    /// Groups to poll, and those the catalog names. Taken before `lists`, `signals` and
    /// `failing` whenever a group's entry in them is added or removed, so that a group
    /// forgotten while its list was being fetched is not put back.
    groups: Mutex<Groups>,
    /// Groups whose last fetch failed, since when their fetches fail and how the last one
    /// did: each is warned about once, when it starts failing, and told about again when it
    /// is back; a call of such a group without runners is told the npm cannot be reached.
    failing: Mutex<HashMap<String, (Instant, Failure)>>,
    /// Wakes the poller when a new group is seen.
    new_group: Notify,
    /// Wakes the poller when the npm says its membership changed.
    membership_changed: Notify,
    /// The groups the npm said changed since the poller last looked: it fetches only
    /// those after a change.
    changed: Mutex<Changed>,
    /// Whether the membership watch is up (polling slows down).
    watching: AtomicBool,
    /// A channel without a per-request timeout, for the watch stream.
    watch: RunnerManagerClient<WithoutStatusDetails<Channel>>,
    tls: TlsMode,
    client_config: ClientConfig,
    npm: RunnerManagerClient<WithoutStatusDetails<Channel>>,
    poll_interval: Duration,
    /// Warnings about runner lists the LB does not take as they are (a minute apart).
    list_warnings: Throttle,
}

impl NpmPool {
    /// A pool fed by the npm at `npm_address`. Run [`NpmPool::run`] to keep it fresh.
    ///
    /// # Errors
    /// When the address is invalid or the TLS configuration is rejected.
    pub fn new(
        npm_address: &str,
        tls: &TlsMode,
        client_config: ClientConfig,
        poll_interval: Duration,
    ) -> Result<Self, tonic::transport::Error> {
        let endpoint = fn_tls::grpc_endpoint(tls, npm_address)?;
        let channel = endpoint
            .clone()
            .with(|e| {
                e.connect_timeout(client_config.connect_timeout)
                    .timeout(Duration::from_secs(2))
            })
            .connect_lazy();
        // The endpoint's keepalive pings find an npm that vanished without closing the
        // stream (or a list call's connection).
        let watch_channel = endpoint
            .with(|e| e.connect_timeout(client_config.connect_timeout))
            .connect_lazy();
        Ok(NpmPool {
            inner: Arc::new(Inner {
                lists: RwLock::new(HashMap::new()),
                signals: RwLock::new(HashMap::new()),
                groups: Mutex::new(Groups {
                    polled: BTreeSet::new(),
                    named: None,
                }),
                failing: Mutex::new(HashMap::new()),
                new_group: Notify::new(),
                membership_changed: Notify::new(),
                changed: Mutex::new(Changed::Groups(BTreeSet::new())),
                watching: AtomicBool::new(false),
                watch: RunnerManagerClient::new(WithoutStatusDetails(watch_channel)),
                tls: tls.clone(),
                client_config,
                npm: RunnerManagerClient::new(WithoutStatusDetails(channel)),
                poll_interval,
                list_warnings: Throttle::new(Duration::from_secs(60)),
            }),
        })
    }

    /// Polls the npm for every seen group until cancelled.
    ///
    /// # Errors
    /// Never; the signature fits the lifecycle's service runner.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), std::convert::Infallible> {
        let watcher = tokio::spawn(Arc::clone(&self.inner).watch(cancel.clone()));
        let _stop_watching = AbortOnDrop(watcher);
        // What woke the poller: anything but a membership message (the start, a new group,
        // the poll interval) has it fetch every group.
        let mut fetch_all = true;
        // When the last pass over every group ended: the next is due the poll interval after
        // it, however many membership messages wake the poller meanwhile (a sleep begun
        // afresh at each wake-up never ended while messages came closer than the interval).
        let mut fetched_all = Instant::now();
        loop {
            let changed = std::mem::replace(
                &mut *self.inner.lock_changed(),
                Changed::Groups(BTreeSet::new()),
            );
            // Every group, whatever woke the poller, when the npm could not say which changed.
            let all = fetch_all || matches!(changed, Changed::All);
            let groups: Vec<String> = {
                let polled = &self.inner.lock_groups().polled;
                match changed {
                    // The groups named, and those whose last fetch failed: each pass tries
                    // them again, whichever groups woke it.
                    Changed::Groups(mut changed) if !fetch_all => {
                        changed.extend(self.inner.lock_failing().keys().cloned());
                        changed
                            .into_iter()
                            .filter(|group| polled.contains(group))
                            .collect()
                    }
                    _ => polled.iter().cloned().collect(),
                }
            };
            // Fetched together, a bounded number at once: one after another, a change in
            // the last of G groups reached the LB G round trips after the watch said so.
            let pool = &self;
            let mut fetches = futures::stream::iter(groups)
                .map(|group| async move {
                    let fetched = pool.refresh(&group).await;
                    (group, fetched)
                })
                .buffer_unordered(MAX_FETCHES_IN_FLIGHT);
            while let Some((group, fetched)) = fetches.next().await {
                let known = self.inner.lock_groups();
                if !known.polled.contains(&group) {
                    continue; // forgotten while it was fetched
                }
                let mut failing = self.inner.lock_failing();
                match fetched {
                    Ok(()) => {
                        if failing.remove(&group).is_some() {
                            tracing::info!(group, "runner list from the npm again");
                        }
                    }
                    Err(status) => match failing.get_mut(&group) {
                        Some((_, failure)) => {
                            tracing::debug!(group, error = %status, "GetLBGroup failed");
                            *failure = Failure::of(&status);
                        }
                        None => {
                            tracing::warn!(group, error = %status, "cannot get the group's runner list from the npm; keeping the last known list");
                            failing.insert(group, (Instant::now(), Failure::of(&status)));
                        }
                    },
                }
            }
            if all {
                fetched_all = Instant::now();
            }
            // While the npm answers with errors, keep asking at the configured interval:
            // a watch that is up says nothing about whether the lists can be fetched.
            let failing = !self.inner.lock_failing().is_empty();
            let pause = if self.inner.watching.load(Ordering::Acquire) && !failing {
                WATCHED_POLL_INTERVAL.max(self.inner.poll_interval)
            } else {
                self.inner.poll_interval
            };
            fetch_all = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = self.inner.new_group.notified() => true,
                () = self.inner.membership_changed.notified() => false,
                () = tokio::time::sleep_until(fetched_all + pause) => true,
            };
        }
    }

    /// Fetches one group's list and swaps it in.
    async fn refresh(&self, group: &str) -> Result<(), tonic::Status> {
        let mut npm = self.inner.npm.clone();
        let membership = npm
            .get_lb_group(LbGroupId {
                id: group.to_owned(),
            })
            .await?
            .into_inner();
        let current = self.runners(group);
        let by_address: HashMap<&str, &Arc<RunnerClient>> =
            current.iter().map(|c| (c.address(), c)).collect();
        let listed = membership.runners.len();
        if listed > MAX_RUNNERS_PER_GROUP {
            fn_lifecycle::warn_throttled!(
                self.inner.list_warnings,
                group,
                listed,
                kept = MAX_RUNNERS_PER_GROUP,
                "the npm lists more runners for the group than an LB takes; using the first ones"
            );
        }
        let mut next = Vec::with_capacity(listed.min(MAX_RUNNERS_PER_GROUP));
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        for runner in membership.runners.into_iter().take(MAX_RUNNERS_PER_GROUP) {
            // One runner, one place in the list: a second entry for an address would give
            // it a second share of the calls and of the hash ring.
            if !seen.insert(runner.address.clone()) {
                fn_lifecycle::warn_throttled!(
                    self.inner.list_warnings,
                    group,
                    address = %runner.address,
                    "the npm lists a runner address twice; the second entry is skipped"
                );
                continue;
            }
            if let Some(existing) = by_address.get(runner.address.as_str()) {
                next.push(Arc::clone(existing));
                continue;
            }
            if let Err(e) = check_host_port(&runner.address) {
                tracing::warn!(group, error = %e, "npm listed an unusable runner address; skipped");
                continue;
            }
            let config = ClientConfig {
                report_signal: self.report_signal(group),
                ..self.inner.client_config.clone()
            };
            match RunnerClient::new(runner.id, runner.address.clone(), &self.inner.tls, config) {
                Ok(client) => next.push(client),
                Err(e) => {
                    tracing::warn!(group, address = %runner.address, error = %e, "cannot create a runner client")
                }
            }
        }
        let changed = next.len() != current.len()
            || next
                .iter()
                .zip(current.iter())
                .any(|(a, b)| !Arc::ptr_eq(a, b));
        if changed {
            let groups = self.inner.lock_groups();
            if !groups.polled.contains(group) {
                return Ok(()); // forgotten while it was fetched
            }
            let addresses: Vec<&str> = next.iter().map(|c| c.address()).collect();
            tracing::info!(group, runners = ?addresses, "runner list changed");
            self.inner
                .lists
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(group.to_owned(), Arc::new(next));
            drop(groups);
            // Calls waiting for room look at the new list now, not at their next retry
            // (a runner from zero, under any placer).
            self.report_signal(group).report();
        }
        Ok(())
    }
}

/// Aborts the task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Inner {
    /// Follows the npm's membership watch until cancelled: each message wakes the poller.
    /// Reconnects with backoff; stops for good when the npm does not have the RPC.
    async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let mut npm = self.watch.clone();
            let opened = tokio::select! {
                () = cancel.cancelled() => return,
                opened = npm.watch_membership(()) => opened,
            };
            match opened {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        let message = tokio::select! {
                            () = cancel.cancelled() => return,
                            message = stream.message() => message,
                        };
                        match message {
                            Ok(Some(message)) => {
                                if !self.watching.swap(true, Ordering::AcqRel) {
                                    tracing::debug!("following the npm's membership changes");
                                }
                                backoff.reset();
                                self.note_changed(message.groups);
                                self.membership_changed.notify_one();
                            }
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(error = %status, "membership watch broke");
                                break;
                            }
                        }
                    }
                    self.watching.store(false, Ordering::Release);
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::info!("the npm has no membership watch; polling runner lists only");
                    return;
                }
                Err(status) => {
                    tracing::debug!(error = %status, "cannot open the membership watch");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Notes the groups a membership message names for the poller: those it polls, or every
    /// group when it names none (its stream's first message, an npm that names none).
    fn note_changed(&self, named: Vec<String>) {
        let polled = &self.lock_groups().polled;
        let mut changed = self.lock_changed();
        match &mut *changed {
            Changed::All => {}
            Changed::Groups(_) if named.is_empty() => *changed = Changed::All,
            Changed::Groups(groups) => {
                groups.extend(named.into_iter().filter(|group| polled.contains(group)));
            }
        }
    }

    fn lock_changed(&self) -> std::sync::MutexGuard<'_, Changed> {
        // Replaced or extended whole: a panic elsewhere cannot tear it.
        self.changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_groups(&self) -> std::sync::MutexGuard<'_, Groups> {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_failing(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Failure)>> {
        // A map edited in single inserts and removals: a panic elsewhere cannot tear it.
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The groups the npm said changed since the poller last looked.
#[derive(Debug)]
enum Changed {
    /// These (only groups the pool polls).
    Groups(BTreeSet<String>),
    /// Any may have: every group is fetched.
    All,
}

/// The groups the pool knows of.
#[derive(Debug)]
struct Groups {
    /// Groups to poll: each seen in a call, and named by the catalog once it is known.
    polled: BTreeSet<String>,
    /// The groups the catalog names, once the LB has said ([`RunnerPool::retain_groups`]);
    /// until then any group seen in a call is polled. A call of a group outside it (one
    /// that found its function in the catalog before a reload) registers nothing.
    named: Option<HashSet<String>>,
}

impl Groups {
    /// Whether the catalog names `group` (or the LB has not said which it names).
    fn named(&self, group: &str) -> bool {
        self.named
            .as_ref()
            .is_none_or(|named| named.contains(group))
    }
}

/// Why a group's list could not be fetched: the status's code, and whether the npm itself
/// answered it (a status without a transport error as its source) or it was the
/// connection's (a refused connection, a timeout).
#[derive(Debug, Clone, Copy)]
struct Failure {
    code: tonic::Code,
    answered: bool,
}

impl Failure {
    fn of(status: &tonic::Status) -> Self {
        Failure {
            code: status.code(),
            answered: std::error::Error::source(status).is_none(),
        }
    }
}

impl RunnerPool for NpmPool {
    fn runners(&self, group: &str) -> RunnerList {
        if let Some(list) = self
            .inner
            .lists
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(group)
        {
            return Arc::clone(list);
        }
        let mut groups = self.inner.lock_groups();
        if groups.named(group) && groups.polled.insert(group.to_owned()) {
            tracing::info!(group, "new LB group; asking the npm for its runners");
            self.inner.new_group.notify_one();
        }
        Arc::new(Vec::new())
    }

    fn list_trouble(&self, group: &str) -> Option<String> {
        if !self.inner.lock_groups().named(group) {
            return Some(
                "the catalog no longer names the group (a reload took its functions out or \
                 moved them)"
                    .to_owned(),
            );
        }
        let (since, Failure { code, answered }) = *self.inner.lock_failing().get(group)?;
        // Whole milliseconds: the answer is read by people.
        let failing_for =
            Duration::from_millis(u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX));
        let head =
            format!("the npm (FN_NPM_ADDRESS) has not given its runner list for {failing_for:?}");
        // The code, not the status's message, which may name addresses: this goes to clients.
        Some(match code {
            // The npm's own answer while it loads its runner set or relearns its groups
            // after a restart: it runs, and lists will come.
            tonic::Code::Unavailable if answered => format!(
                "{head}: it answers that it has none yet ({code:?}: it is starting, or \
                 relearning its groups from the LBs' adverts after a restart)"
            ),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => format!(
                "{head}: it cannot be reached ({code:?}); check that the npm runs and that \
                 FN_NPM_ADDRESS names it"
            ),
            _ => format!("{head}: it refuses to give it ({code:?}); see the npm's log"),
        })
    }

    fn report_signal(&self, group: &str) -> ReportSignal {
        // Read on every call: shared, and written once per group.
        let signals = &self.inner.signals;
        if let Some(signal) = signals
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(group)
        {
            return signal.clone();
        }
        let groups = self.inner.lock_groups();
        if !groups.named(group) {
            // No runner of a group the catalog does not name reports: a signal of its own,
            // kept by no one but the caller.
            return ReportSignal::default();
        }
        signals
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(group.to_owned())
            .or_default()
            .clone()
    }

    fn retain_groups(&self, named: &BTreeSet<&str>) {
        let mut groups = self.inner.lock_groups();
        groups.named = Some(named.iter().map(|&g| g.to_owned()).collect());
        let forgotten: Vec<String> = groups
            .polled
            .iter()
            .filter(|g| !named.contains(g.as_str()))
            .cloned()
            .collect();
        // Signals of groups seen but never polled (a call's first step) go too.
        self.inner
            .signals
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|g, _| named.contains(g.as_str()));
        if forgotten.is_empty() {
            return;
        }
        let mut lists = self
            .inner
            .lists
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut failing = self.inner.lock_failing();
        for group in &forgotten {
            groups.polled.remove(group);
            lists.remove(group);
            failing.remove(group);
        }
        drop((lists, failing, groups));
        tracing::info!(groups = ?forgotten, "LB groups no longer in the catalog; their runner lists are forgotten and no longer fetched");
    }
}

impl NpmPool {
    /// The groups the pool keeps anything of (polled, listed, signalled or failing): for
    /// tests.
    #[doc(hidden)]
    #[must_use]
    pub fn groups_held(&self) -> BTreeSet<String> {
        let groups = self.inner.lock_groups();
        let mut held = groups.polled.clone();
        held.extend(
            self.inner
                .lists
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys()
                .cloned(),
        );
        held.extend(
            self.inner
                .signals
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys()
                .cloned(),
        );
        held.extend(self.inner.lock_failing().keys().cloned());
        held
    }
}
