//! Runner pools: which runners serve an LB group, in an order every LB agrees on.

use std::collections::BTreeSet;
use std::sync::Arc;

use fn_tls::TlsMode;

use crate::client::{ClientConfig, RunnerClient};
use crate::reports::ReportSignal;

/// The runners of one LB group, in the pool's stable order. Placers index into it, so a
/// runner that cannot be reached stays in its slot (as a placeholder) rather than leaving.
pub type RunnerList = Arc<Vec<Arc<RunnerClient>>>;

/// Where the LB finds runners.
pub trait RunnerPool: Send + Sync + std::fmt::Debug {
    /// The current runner list of `group` (a cheap snapshot; may be empty).
    fn runners(&self, group: &str) -> RunnerList;

    /// Woken by the reports of `group`'s runners and by the ends of their calls (see
    /// [`ReportSignal`]): what a call waiting for room in `group` waits on.
    fn report_signal(&self, group: &str) -> ReportSignal;

    /// Why `group`'s runner list may be missing or out of date, when the pool knows (the
    /// npm cannot be reached): what a call of a group without runners is told instead of
    /// "it has none". `None` when the list is as its source gives it.
    fn list_trouble(&self, _group: &str) -> Option<String> {
        None
    }

    /// The groups the catalog names now (after a reload): the pool forgets what it keeps
    /// of any other group and stops fetching its list; a group named again later is
    /// fetched afresh. A pool that keeps nothing per group (the [`StaticPool`]: one list
    /// and one signal for every group) has nothing to forget.
    fn retain_groups(&self, _named: &BTreeSet<&str>) {}
}

/// A fixed runner list (`FN_RUNNER_ADDRESSES`) serving every LB group.
#[derive(Debug)]
pub struct StaticPool {
    runners: RunnerList,
    /// Every group has the same runners: one signal.
    signal: ReportSignal,
}

/// An address in `FN_RUNNER_ADDRESSES` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("FN_RUNNER_ADDRESSES: invalid runner address {address:?}: {reason} (expected host:port)")]
pub struct BadAddress {
    address: String,
    reason: String,
}

impl StaticPool {
    /// One client per address, in the order given; an address given again is left out
    /// (with a warning), as the npm's lists do: it would take two places on the hash ring
    /// and two shares of the calls, and split its state between two clients.
    ///
    /// # Errors
    /// [`BadAddress`] naming the first address that is not `host:port`.
    pub fn new(
        addresses: &[String],
        tls: &TlsMode,
        config: &ClientConfig,
    ) -> Result<Self, BadAddress> {
        let mut seen = std::collections::HashSet::new();
        let runners = addresses
            .iter()
            .filter(|address| {
                let first = seen.insert(address.as_str());
                if !first {
                    tracing::warn!(runner = %address, "FN_RUNNER_ADDRESSES lists this runner more than once; it is used once");
                }
                first
            })
            .map(|address| {
                check_host_port(address)?;
                RunnerClient::new(address.clone(), address.clone(), tls, config.clone()).map_err(
                    |e| BadAddress {
                        address: address.clone(),
                        reason: e.to_string(),
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StaticPool {
            runners: Arc::new(runners),
            signal: config.report_signal.clone(),
        })
    }
}

/// Checks that `address` is `host:port` with a valid port.
///
/// # Errors
/// [`BadAddress`] saying what is wrong.
pub fn check_host_port(address: &str) -> Result<(), BadAddress> {
    let bad = |reason: &str| BadAddress {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("port must be 1-65535"))?;
    Ok(())
}

impl RunnerPool for StaticPool {
    fn runners(&self, _group: &str) -> RunnerList {
        Arc::clone(&self.runners)
    }

    fn report_signal(&self, _group: &str) -> ReportSignal {
        self.signal.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert!(check_host_port("10.0.0.5:9190").is_ok());
        assert!(check_host_port("runner-1:9190").is_ok());
        assert!(check_host_port("[::1]:9190").is_ok());
        for bad in ["10.0.0.5", ":9190", "host:0", "host:http", "host:70000"] {
            let err = check_host_port(bad).expect_err(bad);
            assert!(
                err.to_string().starts_with("FN_RUNNER_ADDRESSES: "),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn an_address_given_twice_takes_one_place() {
        let addresses: Vec<String> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:1"]
            .map(String::from)
            .into();
        let pool = StaticPool::new(&addresses, &TlsMode::Insecure, &ClientConfig::default())
            .expect("valid");
        let listed: Vec<_> = pool
            .runners("a")
            .iter()
            .map(|r| r.address().to_owned())
            .collect();
        assert_eq!(listed, ["127.0.0.1:1", "127.0.0.1:2"]);
    }

    #[tokio::test]
    async fn static_pool_keeps_order_for_every_group() {
        let addresses = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let pool = StaticPool::new(&addresses, &TlsMode::Insecure, &ClientConfig::default())
            .expect("valid");
        let a: Vec<_> = pool
            .runners("a")
            .iter()
            .map(|r| r.address().to_owned())
            .collect();
        let b: Vec<_> = pool
            .runners("b")
            .iter()
            .map(|r| r.address().to_owned())
            .collect();
        assert_eq!(a, addresses);
        assert_eq!(a, b);
    }
}
