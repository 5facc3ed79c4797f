//! The `static` control plane: a fixed list of runner addresses (`FN_RUNNER_ADDRESSES`).
//!
//! The runners exist independently of the npm; "provisioning" assigns a free address to a
//! group and "removing" returns it to the free list. Assignments live in memory: after an npm
//! restart the list is re-assigned as demand requires.

use std::sync::Mutex;
use std::time::SystemTime;

use futures::future::BoxFuture;

use super::{ControlPlane, ControlPlaneError, RunnerInfo};

/// A fixed runner list handed out to groups.
#[derive(Debug)]
pub struct StaticControlPlane {
    runner_mb: u64,
    /// Address → the runner if assigned to a group. Insertion order is the configured order.
    slots: Mutex<Vec<(String, Option<RunnerInfo>)>>,
}

impl StaticControlPlane {
    pub fn new(addresses: Vec<String>, runner_mb: u64) -> Self {
        StaticControlPlane {
            runner_mb,
            slots: Mutex::new(addresses.into_iter().map(|a| (a, None)).collect()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Option<RunnerInfo>)>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ControlPlane for StaticControlPlane {
    fn runner_memory_mb(&self) -> u64 {
        self.runner_mb
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<RunnerInfo>, ControlPlaneError>> {
        let listed = self.lock().iter().filter_map(|(_, r)| r.clone()).collect();
        Box::pin(async move { Ok(listed) })
    }

    fn provision<'a>(
        &'a self,
        group: &'a str,
        count: usize,
        // Nothing to wait for: the addresses are assigned at once.
        _cancel: &'a tokio_util::sync::CancellationToken,
    ) -> BoxFuture<'a, Result<Vec<RunnerInfo>, ControlPlaneError>> {
        let mut slots = self.lock();
        let mut out = Vec::new();
        for (address, slot) in slots.iter_mut().filter(|(_, s)| s.is_none()).take(count) {
            let info = RunnerInfo {
                id: address.clone(),
                address: address.clone(),
                group: group.to_owned(),
                created: SystemTime::now(),
            };
            *slot = Some(info.clone());
            out.push(info);
        }
        drop(slots);
        Box::pin(async move {
            if out.is_empty() && count > 0 {
                Err(ControlPlaneError::Exhausted(
                    "every address in FN_RUNNER_ADDRESSES is assigned".into(),
                ))
            } else {
                Ok(out)
            }
        })
    }

    fn remove<'a>(
        &'a self,
        runner: &'a RunnerInfo,
    ) -> BoxFuture<'a, Result<(), ControlPlaneError>> {
        for (address, slot) in self.lock().iter_mut() {
            if *address == runner.address {
                *slot = None;
            }
        }
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hands_out_each_address_once() {
        let cp = StaticControlPlane::new(vec!["a:1".into(), "b:1".into()], 512);
        let got = cp
            .provision("g", 5, &tokio_util::sync::CancellationToken::new())
            .await
            .expect("two free");
        assert_eq!(got.len(), 2);
        assert!(matches!(
            cp.provision("g", 1, &tokio_util::sync::CancellationToken::new())
                .await,
            Err(ControlPlaneError::Exhausted(_))
        ));
        assert_eq!(cp.list().await.expect("list").len(), 2);
        cp.remove(&got[0]).await.expect("remove");
        let again = cp
            .provision("h", 1, &tokio_util::sync::CancellationToken::new())
            .await
            .expect("one free again");
        assert_eq!(again[0].address, "a:1");
        assert_eq!(again[0].group, "h");
    }
}
