//! Named services run together and stop together.
//!
//! Each service is an async function of a [`CancellationToken`]; it runs until the token is
//! cancelled and then finishes its in-flight work and returns. [`Services::run`] waits for
//! the shutdown future (SIGTERM in production, a oneshot in tests). When it fires, or when any
//! service stops on its own, the health switch goes NOT_SERVING, every token is cancelled,
//! and the remaining services get the grace period to return.
//!
//! With a drain delay ([`Services::with_drain_delay`]), a requested shutdown first reports
//! NOT_SERVING and keeps every service running for the delay, so that upstream balancers see
//! the health change and stop sending work before the listeners close (Envoy's drain,
//! Kubernetes' preStop delay). A service that fails cuts the delay short.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Health;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
/// What a service's task returns: its name and how it ended.
type Ended = (&'static str, Result<(), BoxError>);

/// Why a daemon did not stop cleanly. The process should exit non-zero.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("service `{name}` failed: {source}")]
    Failed {
        name: &'static str,
        source: BoxError,
    },
    #[error("service `{name}` stopped unexpectedly")]
    StoppedEarly { name: &'static str },
    #[error("service `{name}` panicked")]
    Panicked { name: &'static str },
    #[error("shutdown took longer than {grace:?}; abandoned: {pending}")]
    Timeout { grace: Duration, pending: String },
}

/// A set of named services sharing one shutdown.
#[derive(Debug)]
pub struct Services {
    root: CancellationToken,
    tasks: JoinSet<Ended>,
    /// The name of each service still running, by its task.
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
    health: Option<Health>,
    drain_delay: Duration,
}

impl Services {
    /// An empty set under `root`: cancelling `root` from outside also stops everything.
    pub fn new(root: CancellationToken) -> Self {
        Services {
            root,
            tasks: JoinSet::new(),
            names: std::collections::HashMap::new(),
            health: None,
            drain_delay: Duration::ZERO,
        }
    }

    /// The switch flipped to NOT_SERVING as the first step of shutdown.
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = Some(health);
        self
    }

    /// On a requested shutdown, report NOT_SERVING and keep serving for `delay` before the
    /// services are cancelled.
    pub fn with_drain_delay(mut self, delay: Duration) -> Self {
        self.drain_delay = delay;
        self
    }

    /// Starts `service` with its own child token.
    pub fn spawn<F, Fut, E>(&mut self, name: &'static str, service: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let token = self.root.child_token();
        let fut = service(token);
        let task = self
            .tasks
            .spawn(async move { (name, fut.await.map_err(Into::into)) });
        self.names.insert(task.id(), name);
    }

    /// Runs until `shutdown` completes or a service stops, then shuts everything down
    /// within `grace`.
    ///
    /// # Errors
    /// The first service failure, a service that stopped before shutdown was asked for, or
    /// a shutdown that overran `grace`.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> Result<(), ServiceError> {
        let mut first_error = None;
        let requested = tokio::select! {
            () = shutdown => true,
            () = self.root.cancelled() => false,
            Some(joined) = self.tasks.join_next_with_id() => {
                first_error = Some(self.ended_early(joined));
                false
            }
        };

        if let Some(health) = &self.health {
            health.set_not_serving().await;
        }
        if requested && !self.drain_delay.is_zero() {
            tracing::info!(delay = ?self.drain_delay, "reporting NOT_SERVING; still serving until the drain delay ends");
            tokio::select! {
                () = tokio::time::sleep(self.drain_delay) => {}
                () = self.root.cancelled() => {}
                Some(joined) = self.tasks.join_next_with_id() => {
                    first_error = Some(self.ended_early(joined));
                }
            }
        }
        self.root.cancel();
        tracing::info!(grace = ?grace, "draining");

        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                let err = match joined {
                    Ok((id, (name, Ok(())))) => {
                        self.names.remove(&id);
                        tracing::debug!(service = name, "stopped");
                        continue;
                    }
                    Ok((id, (name, Err(source)))) => {
                        self.names.remove(&id);
                        ServiceError::Failed { name, source }
                    }
                    Err(e) => ServiceError::Panicked {
                        name: self.panicked_name(&e),
                    },
                };
                tracing::error!(error = %err, "service failed during shutdown");
                first_error.get_or_insert(err);
            }
        })
        .await;

        if drained.is_err() {
            self.tasks.abort_all();
            let err = ServiceError::Timeout {
                grace,
                pending: self.pending_names(),
            };
            tracing::error!(error = %err, "shutdown overran its bound");
            return Err(first_error.unwrap_or(err));
        }
        match first_error {
            Some(err) => Err(err),
            None => {
                tracing::info!("shutdown complete");
                Ok(())
            }
        }
    }

    /// The error for a service that ended before it was asked to.
    fn ended_early(
        &mut self,
        joined: Result<(tokio::task::Id, Ended), tokio::task::JoinError>,
    ) -> ServiceError {
        let err = match joined {
            Ok((id, (name, ended))) => {
                self.names.remove(&id);
                match ended {
                    Ok(()) => ServiceError::StoppedEarly { name },
                    Err(source) => ServiceError::Failed { name, source },
                }
            }
            Err(e) => ServiceError::Panicked {
                name: self.panicked_name(&e),
            },
        };
        tracing::error!(error = %err, "stopping all services");
        err
    }

    /// The name of the service whose task ended with `err`, no longer running.
    fn panicked_name(&mut self, err: &tokio::task::JoinError) -> &'static str {
        tracing::error!(error = %err, "a service task panicked");
        self.names
            .remove(&err.id())
            .unwrap_or("unknown (see the log)")
    }

    /// The services still running, in name order.
    fn pending_names(&self) -> String {
        let mut pending: Vec<&str> = self.names.values().copied().collect();
        pending.sort_unstable();
        pending.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn shutdown_cancels_every_service_and_succeeds() {
        let stopped = Arc::new(AtomicBool::new(false));
        let mut services = Services::new(CancellationToken::new());
        let flag = stopped.clone();
        services.spawn("a", move |cancel| async move {
            cancel.cancelled().await;
            flag.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        });
        services.spawn("b", |cancel| async move {
            cancel.cancelled().await;
            Ok::<_, std::io::Error>(())
        });
        let (tx, rx) = oneshot::channel::<()>();
        let run = tokio::spawn(services.run(
            async {
                let _ = rx.await;
            },
            Duration::from_secs(5),
        ));
        tx.send(()).expect("runner alive");
        run.await.expect("join").expect("clean shutdown");
        assert!(stopped.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_failing_service_stops_the_others_and_is_named() {
        let other_stopped = Arc::new(AtomicBool::new(false));
        let mut services = Services::new(CancellationToken::new());
        services.spawn("broken", |_cancel| async move {
            Err::<(), _>(std::io::Error::other("disk on fire"))
        });
        let flag = other_stopped.clone();
        services.spawn("healthy", move |cancel| async move {
            cancel.cancelled().await;
            flag.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        });
        let err = services
            .run(std::future::pending(), Duration::from_secs(5))
            .await
            .expect_err("failure propagates");
        assert_eq!(err.to_string(), "service `broken` failed: disk on fire");
        assert!(other_stopped.load(Ordering::SeqCst));
    }

    /// The error names the services that did not stop, not every one started; a panic
    /// names its service.
    #[tokio::test(start_paused = true)]
    async fn shutdown_is_bounded_by_the_grace_period_and_names_what_is_left() {
        let mut services = Services::new(CancellationToken::new());
        for name in ["stuck", "also-stuck"] {
            services.spawn(name, |_cancel| async move {
                std::future::pending::<()>().await;
                Ok::<_, std::io::Error>(())
            });
        }
        services.spawn("prompt", |cancel| async move {
            cancel.cancelled().await;
            Ok::<_, std::io::Error>(())
        });
        let err = services
            .run(async {}, Duration::from_secs(3))
            .await
            .expect_err("times out");
        assert!(matches!(err, ServiceError::Timeout { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "shutdown took longer than 3s; abandoned: also-stuck, stuck"
        );

        let mut services = Services::new(CancellationToken::new());
        services.spawn("steady", |cancel| async move {
            cancel.cancelled().await;
            Ok::<_, std::io::Error>(())
        });
        services.spawn("fragile", |_cancel| async move {
            panic!("a bug");
            #[allow(unreachable_code)]
            Ok::<_, std::io::Error>(())
        });
        let err = services
            .run(std::future::pending(), Duration::from_secs(3))
            .await
            .expect_err("the panic ends it");
        assert_eq!(err.to_string(), "service `fragile` panicked");
    }

    #[tokio::test]
    async fn health_goes_not_serving_at_shutdown() {
        let (health, _svc) = Health::new(&[]);
        health.set_serving().await;
        assert!(health.is_serving());
        let services = Services::new(CancellationToken::new()).with_health(health.clone());
        services
            .run(async {}, Duration::from_secs(1))
            .await
            .expect("nothing to stop");
        assert!(!health.is_serving());
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_drain_delay_services_keep_running_while_health_says_not_serving() {
        let (health, _svc) = Health::new(&[]);
        health.set_serving().await;
        let cancelled_at = Arc::new(std::sync::Mutex::new(None));
        let mut services = Services::new(CancellationToken::new())
            .with_health(health.clone())
            .with_drain_delay(Duration::from_secs(5));
        let seen = Arc::clone(&cancelled_at);
        let probe = health.clone();
        services.spawn("front", move |cancel| async move {
            cancel.cancelled().await;
            let not_serving_first = !probe.is_serving();
            *seen.lock().expect("lock") = Some((tokio::time::Instant::now(), not_serving_first));
            Ok::<_, std::io::Error>(())
        });
        let asked = tokio::time::Instant::now();
        services
            .run(async {}, Duration::from_secs(1))
            .await
            .expect("clean");
        let (at, not_serving_first) = cancelled_at.lock().expect("lock").expect("cancelled");
        assert_eq!(
            at - asked,
            Duration::from_secs(5),
            "cancelled after the delay"
        );
        assert!(
            not_serving_first,
            "health went NOT_SERVING before the delay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_failing_during_the_drain_delay_cuts_it_short() {
        let mut services =
            Services::new(CancellationToken::new()).with_drain_delay(Duration::from_secs(60));
        services.spawn("fails-soon", |_cancel| async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Err::<(), _>(std::io::Error::other("lost the disk"))
        });
        let asked = tokio::time::Instant::now();
        let err = services
            .run(async {}, Duration::from_secs(1))
            .await
            .expect_err("the failure is reported");
        assert_eq!(
            err.to_string(),
            "service `fails-soon` failed: lost the disk"
        );
        assert!(asked.elapsed() < Duration::from_secs(60));
    }
}
