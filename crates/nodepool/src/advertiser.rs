//! The LB's capacity advertiser: tells the npm, every interval, how much memory each LB
//! group needed (the most its calls in flight or waiting for a runner took at once since the
//! previous advert: a snapshot of the moment reads zero between two calls of a busy group
//! under light traffic), and at once when demand rises from zero in a group the npm believes
//! idle (its last advert named it at zero, left it out, or never named it), so that scaling
//! from zero waits for no tick. Early adverts come at least [`early_gap`] apart, so groups
//! the npm keeps seeing as idle (those cut from adverts over the npm's limit) cannot send
//! adverts back to back; a group the npm knows busy waits for the tick.
//!
//! It reads the [`CapacityTracker`] and never touches the call path. A group that went idle
//! is advertised once more at zero and then forgotten. A failed advert is logged and the
//! next tick tries again with the figures it could not send (each group's high-water mark
//! is kept until an advert reaches the npm); tonic reconnects the channel underneath.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use fn_protocol::poolmanager::node_pool_scaler_client::NodePoolScalerClient;
use fn_protocol::poolmanager::{CapacitySnapshot, CapacitySnapshotList, MAX_GROUPS_PER_ADVERT};
use fn_tls::{TlsMode, WithoutStatusDetails};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::CapacityTracker;

/// Least time between two early adverts (those for a rise from zero): a tenth of `interval`,
/// and 20 ms at least.
#[must_use]
pub fn early_gap(interval: Duration) -> Duration {
    (interval / 10).max(Duration::from_millis(20))
}

/// Sends capacity adverts to the npm.
#[derive(Debug)]
pub struct Advertiser {
    lb_id: String,
    tracker: CapacityTracker,
    client: NodePoolScalerClient<WithoutStatusDetails<Channel>>,
    interval: Duration,
    /// Whether the last advert failed (to log a recovery once, and failures once).
    failing: bool,
    /// Whether the last advert left groups out (to warn once, and say when it stops).
    cut: bool,
}

impl Advertiser {
    /// An advertiser for the npm at `npm_address` (`host:port`).
    ///
    /// # Errors
    /// When the address is invalid or the TLS configuration is rejected.
    pub fn new(
        lb_id: impl Into<String>,
        tracker: CapacityTracker,
        npm_address: &str,
        tls: &TlsMode,
        interval: Duration,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = fn_tls::grpc_endpoint(tls, npm_address)?
            .with(|e| {
                e.connect_timeout(Duration::from_secs(2))
                    .timeout(interval.max(Duration::from_secs(1)))
            })
            .connect_lazy();
        Ok(Advertiser {
            lb_id: lb_id.into(),
            tracker,
            client: NodePoolScalerClient::new(WithoutStatusDetails(channel)),
            interval,
            failing: false,
            cut: false,
        })
    }

    /// Advertises every interval until cancelled, then once more (the final figures).
    ///
    /// # Errors
    /// Never; the signature fits the lifecycle's service runner.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), std::convert::Infallible> {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let gap = early_gap(self.interval);
        // When the last rise from zero was looked at: each wake is, at most once a gap.
        let mut last_early: Option<Instant> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => self.advertise(false).await,
                () = self.tracker.risen_from_zero() => {
                    if let Some(last) = last_early {
                        tokio::select! {
                            () = cancel.cancelled() => break,
                            () = tokio::time::sleep_until(last + gap) => {}
                        }
                    }
                    last_early = Some(Instant::now());
                    // The call that woke us may have ended (the next tick carries it), or a
                    // tick may have told the npm already.
                    if self.tracker.unannounced_demand() {
                        self.advertise(false).await;
                        tick.reset();
                    }
                }
            }
        }
        // Marked as the last: the npm forgets this LB now, not as one gone silent.
        self.advertise(true).await;
        Ok(())
    }

    /// `totals`, or when there are more groups than one advert may carry
    /// ([`MAX_GROUPS_PER_ADVERT`]; the npm refuses a longer one whole), those with the most
    /// demand, in name order among equals. The rest count as zero at the npm until they
    /// fit; the groups just gone idle are among them, and are sent when there is room.
    fn within_the_npms_limit(&mut self, totals: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
        let groups = totals.len();
        let mut totals: Vec<(String, u64)> =
            totals.iter().map(|(g, mb)| (g.clone(), *mb)).collect();
        if groups <= MAX_GROUPS_PER_ADVERT {
            if self.cut {
                tracing::info!(groups, "capacity adverts carry every group's demand again");
                self.cut = false;
            }
            return totals;
        }
        // Stable: name order among equal demands.
        totals.sort_by_key(|(_, mb)| std::cmp::Reverse(*mb));
        totals.truncate(MAX_GROUPS_PER_ADVERT);
        if !self.cut {
            tracing::warn!(
                groups,
                sent = MAX_GROUPS_PER_ADVERT,
                "more LB groups have demand than one capacity advert carries: the npm is told \
                 those with the most, and scales the others as if idle"
            );
            self.cut = true;
        }
        totals
    }

    /// Sends the demand of every group since the previous advert (including groups that
    /// just went to zero).
    pub async fn advertise_once(&mut self) {
        self.advertise(false).await;
    }

    /// One advert; `leaving` marks it as this LB's last.
    async fn advertise(&mut self, leaving: bool) {
        // Sent even when empty: an advert is also the LB's heartbeat, so the npm purges
        // only LBs that are really gone.
        let demand = self.tracker.snapshot_for_advert();
        let totals = self.within_the_npms_limit(&demand);
        let ts_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let request = CapacitySnapshotList {
            ts_unix_ms,
            lb_id: self.lb_id.clone(),
            snapshots: totals
                .iter()
                .map(|(group, mb)| CapacitySnapshot {
                    group_id: group.clone(),
                    mem_mb_total: *mb,
                })
                .collect(),
            leaving,
        };
        match self.client.advertise_capacity(request).await {
            Ok(_) => {
                if self.failing {
                    tracing::info!("capacity adverts reach the npm again");
                    self.failing = false;
                }
                let sent: BTreeMap<&str, u64> =
                    totals.iter().map(|(g, mb)| (g.as_str(), *mb)).collect();
                self.tracker.advertised(&sent);
                // Groups cut from the advert keep their high-water mark for the next one.
                self.tracker.not_advertised(
                    demand
                        .iter()
                        .filter(|(g, _)| !sent.contains_key(g.as_str()))
                        .map(|(g, mb)| (g.as_str(), *mb)),
                );
            }
            Err(status) => {
                // The npm heard none of it: the next advert carries this one's figures too.
                self.tracker
                    .not_advertised(demand.iter().map(|(g, mb)| (g.as_str(), *mb)));
                if self.failing {
                    tracing::debug!(error = %status, "capacity advert failed");
                } else {
                    tracing::warn!(error = %status, "capacity advert to the npm failed; retrying every {:?}", self.interval);
                    self.failing = true;
                }
            }
        }
    }
}
