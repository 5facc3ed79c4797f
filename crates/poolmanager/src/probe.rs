//! The real [`RunnerProbe`]: the runner's `Status` over mutual TLS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fn_nodepool::{ClientConfig, RunnerClient};
use fn_tls::TlsMode;
use futures::future::BoxFuture;

use crate::control_plane::RunnerInfo;
use crate::manager::RunnerProbe;

/// Asks runners for their status; keeps one client per address, until the runner is
/// forgotten (the process control plane hands out a new address to every runner it spawns,
/// so the map would otherwise grow for as long as the npm runs).
#[derive(Debug)]
pub struct GrpcProbe {
    tls: TlsMode,
    clients: Mutex<HashMap<String, Arc<RunnerClient>>>,
}

impl GrpcProbe {
    pub fn new(tls: TlsMode) -> Self {
        GrpcProbe {
            tls,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, address: &str) -> Result<Arc<RunnerClient>, String> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.get(address) {
            return Ok(Arc::clone(c));
        }
        let client = RunnerClient::new(address, address, &self.tls, ClientConfig::default())
            .map_err(|e| e.to_string())?;
        clients.insert(address.to_owned(), Arc::clone(&client));
        Ok(client)
    }
}

impl RunnerProbe for GrpcProbe {
    fn calls_in_flight<'a>(&'a self, runner: &'a RunnerInfo) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async move {
            let client = self.client(&runner.address)?;
            client
                .status()
                .await
                .map(|s| s.calls_in_flight)
                .map_err(|s| s.to_string())
        })
    }

    fn forget(&self, runner: &RunnerInfo) {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&runner.address);
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[tokio::test]
    async fn clients_are_kept_per_address_until_forgotten() {
        let probe = GrpcProbe::new(TlsMode::Insecure);
        let runner = RunnerInfo {
            id: "r1".into(),
            address: "127.0.0.1:1".into(),
            group: "g".into(),
            created: SystemTime::now(),
        };
        let first = probe.client(&runner.address).expect("client");
        let again = probe.client(&runner.address).expect("client");
        assert!(Arc::ptr_eq(&first, &again));
        probe.forget(&runner);
        assert!(probe.clients.lock().expect("lock").is_empty());
    }
}
