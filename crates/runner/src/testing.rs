//! A fake driver for unit tests: instances that echo their request body, counted so tests
//! can assert starts, reuse and kills. Compiled only for tests.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use futures::StreamExt;
use futures::future::BoxFuture;
use http::{HeaderMap, StatusCode};

use crate::driver::{
    BodyStream, Driver, DriverError, FunctionRequest, FunctionResponse, Instance, InstanceSpec,
};

/// Counts starts and kills; instances echo.
#[derive(Debug, Default)]
pub struct FakeDriver {
    started: AtomicUsize,
    killed: Arc<AtomicUsize>,
    next_pid: AtomicU32,
    /// When set, every start fails.
    failing: AtomicBool,
    /// How long a killed instance takes to be gone (a container's removal); at once when
    /// unset.
    end_after_kill: Mutex<Option<Duration>>,
    /// Killed instances seen gone.
    gone: Arc<AtomicUsize>,
}

impl FakeDriver {
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub fn killed(&self) -> usize {
        self.killed.load(Ordering::SeqCst)
    }

    /// Makes every later start fail (or succeed again).
    pub fn fail_starts(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes instances started later take `delay` after their kill to be gone.
    pub fn end_after_kill(&self, delay: Duration) {
        *self
            .end_after_kill
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(delay);
    }

    /// Killed instances that are gone by now.
    pub fn gone(&self) -> usize {
        self.gone.load(Ordering::SeqCst)
    }
}

impl Driver for FakeDriver {
    fn start(
        &self,
        _spec: &InstanceSpec,
        _call_id: &str,
        _start_timeout: Duration,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, DriverError>> {
        if self.failing.load(Ordering::SeqCst) {
            return Box::pin(async { Err(DriverError::Start("fake driver: start failed".into())) });
        }
        self.started.fetch_add(1, Ordering::SeqCst);
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst) + 1000;
        let instance = FakeInstance {
            pid,
            alive: AtomicBool::new(true),
            killed: self.killed.clone(),
            end_after_kill: *self
                .end_after_kill
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            gone: CancellationToken::new(),
            gone_count: self.gone.clone(),
        };
        Box::pin(async move { Ok(Box::new(instance) as Box<dyn Instance>) })
    }
}

#[derive(Debug)]
struct FakeInstance {
    pid: u32,
    alive: AtomicBool,
    killed: Arc<AtomicUsize>,
    end_after_kill: Option<Duration>,
    gone: CancellationToken,
    gone_count: Arc<AtomicUsize>,
}

impl Instance for FakeInstance {
    fn call(
        &self,
        _request: FunctionRequest,
        body: BodyStream<std::io::Error>,
    ) -> BoxFuture<'_, Result<FunctionResponse, DriverError>> {
        Box::pin(async move {
            let body = body.map(|chunk| chunk.map_err(|e| DriverError::Function(e.to_string())));
            Ok(FunctionResponse {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Box::pin(body),
            })
        })
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn kill(&self) {
        if self.alive.swap(false, Ordering::SeqCst) {
            self.killed.fetch_add(1, Ordering::SeqCst);
            let (gone, count) = (self.gone.clone(), self.gone_count.clone());
            let delay = self.end_after_kill.unwrap_or_default();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                count.fetch_add(1, Ordering::SeqCst);
                gone.cancel();
            });
        }
    }

    fn wait_gone(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.gone.cancelled())
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }
}
