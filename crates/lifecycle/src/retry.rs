//! Backoff schedules. `backoff` 0.4 is unmaintained (RUSTSEC-2025-0012); every use goes
//! through this module so it can be replaced in one place.

use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff as _;

/// An exponential schedule with jitter: `initial`, growing ×2 up to `max`, never ending on
/// its own (callers bound it with their own deadline).
#[derive(Debug)]
pub struct Backoff(ExponentialBackoff);

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff(ExponentialBackoff {
            current_interval: initial,
            initial_interval: initial,
            randomization_factor: 0.3,
            multiplier: 2.0,
            max_interval: max,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        })
    }

    /// The next pause.
    pub fn next_delay(&mut self) -> Duration {
        self.0.next_backoff().unwrap_or(self.0.max_interval)
    }

    /// Sleeps for the next pause (the pause of a poll loop on the async runtime).
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts over from the initial pause.
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(13), "{first:?}");
        let later: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= Duration::from_millis(130)));
        assert!(
            later
                .last()
                .is_some_and(|d| *d >= Duration::from_millis(70))
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(13));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_waits_the_next_pause() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(100));
        for _ in 0..3 {
            let start = tokio::time::Instant::now();
            b.sleep().await;
            let slept = start.elapsed();
            assert!(
                slept >= Duration::from_millis(70) && slept <= Duration::from_millis(131),
                "{slept:?}"
            );
        }
    }
}
