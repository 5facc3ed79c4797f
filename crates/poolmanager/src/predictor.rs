//! Predictors turn wanted capacity into a desired number of runners.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Decides how many runners a group should have.
pub trait Predictor: Send + std::fmt::Debug {
    /// The desired runner count for `wanted_mb` of demand with runners of `runner_mb` each,
    /// before the min/max bounds are applied.
    fn desired(&mut self, wanted_mb: u64, runner_mb: u64, now: Instant) -> usize;
}

/// Runners needed to hold `wanted_mb`.
pub fn runners_for(wanted_mb: u64, runner_mb: u64) -> usize {
    if runner_mb == 0 {
        return 0;
    }
    usize::try_from(wanted_mb.div_ceil(runner_mb)).unwrap_or(usize::MAX)
}

/// The default: scales up at once; scales down only to the highest need seen during the
/// last `window`, so demand must stay low for a whole window before runners drain, and
/// demand that oscillates inside the window causes no flapping.
#[derive(Debug)]
pub struct WindowPredictor {
    window: Duration,
    /// (time, runners needed) samples within the window, oldest first.
    samples: VecDeque<(Instant, usize)>,
}

impl WindowPredictor {
    pub fn new(window: Duration) -> Self {
        WindowPredictor {
            window,
            samples: VecDeque::new(),
        }
    }

    /// A predictor for a group that already has `current` runners: it holds them for a
    /// whole window before scaling down, as if they had been needed until `now`. A freshly
    /// (re)started npm has seen no demand yet; without this it would drain every runner it
    /// adopted on its first tick, before the LBs had advertised again.
    pub fn holding(window: Duration, current: usize, now: Instant) -> Self {
        let mut predictor = Self::new(window);
        predictor.samples.push_back((now, current));
        predictor
    }
}

impl Predictor for WindowPredictor {
    fn desired(&mut self, wanted_mb: u64, runner_mb: u64, now: Instant) -> usize {
        let need = runners_for(wanted_mb, runner_mb);
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.window)
        {
            self.samples.pop_front();
        }
        // Keep the samples a decreasing staircase: an older, smaller sample can never be
        // the maximum again.
        while self.samples.back().is_some_and(|(_, n)| *n <= need) {
            self.samples.pop_back();
        }
        self.samples.push_back((now, need));
        self.samples.front().map_or(need, |(_, n)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up() {
        assert_eq!(runners_for(0, 1024), 0);
        assert_eq!(runners_for(1, 1024), 1);
        assert_eq!(runners_for(2048, 1024), 2);
        assert_eq!(runners_for(2049, 1024), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn up_at_once_down_after_the_window() {
        let mut p = WindowPredictor::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(p.desired(3000, 1024, t0), 3, "scale up immediately");
        assert_eq!(
            p.desired(100, 1024, t0 + Duration::from_secs(5)),
            3,
            "low demand inside the window"
        );
        assert_eq!(
            p.desired(100, 1024, t0 + Duration::from_secs(11)),
            1,
            "low for a whole window"
        );
        assert_eq!(p.desired(0, 1024, t0 + Duration::from_secs(30)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn holding_keeps_the_current_scale_for_a_window() {
        let t0 = Instant::now();
        let mut p = WindowPredictor::holding(Duration::from_secs(10), 3, t0);
        assert_eq!(p.desired(0, 1024, t0), 3, "no demand seen yet");
        assert_eq!(p.desired(5000, 1024, t0 + Duration::from_secs(1)), 5);
        assert_eq!(p.desired(0, 1024, t0 + Duration::from_secs(9)), 5);
        assert_eq!(p.desired(0, 1024, t0 + Duration::from_secs(12)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn oscillation_inside_the_window_does_not_flap() {
        let mut p = WindowPredictor::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut seen = Vec::new();
        for i in 0..40u64 {
            let wanted = if i % 2 == 0 { 4096 } else { 0 };
            seen.push(p.desired(wanted, 1024, t0 + Duration::from_secs(i)));
        }
        assert!(seen.iter().all(|n| *n == 4), "{seen:?}");
    }
}
