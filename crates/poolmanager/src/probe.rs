//! The real [`RunnerProbe`]: the runner's `Status` over mutual TLS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fn_nodepool::{ClientConfig, RunnerClient};
use fn_tls::TlsMode;
use futures::future::BoxFuture;

use crate::control_plane::RunnerInfo;
use crate::manager::RunnerProbe;

/// Asks runners for their status; keeps one client per address.
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
}
