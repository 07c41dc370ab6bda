//! Each camera's recent traffic through the relay, sampled every [`EVERY`] over the last
//! [`SAMPLES`] samples, for the console's sparklines (`GET /traffic`). The samples are
//! read from the camera's byte counters, so the byte path pays nothing for them.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// How often the counters are read.
pub(crate) const EVERY: Duration = Duration::from_secs(10);

/// Samples kept per camera: ten minutes.
pub(crate) const SAMPLES: usize = 60;

/// The cameras' recent traffic; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    cameras: Mutex<HashMap<String, History>>,
}

/// One camera's samples.
#[derive(Debug, Default)]
struct History {
    /// Its byte counter (both directions) at the last sample.
    last_total: Option<u64>,
    /// Bytes per second of each sample, oldest first.
    rates: VecDeque<u64>,
}

impl History {
    fn sample(&mut self, total: Option<u64>) {
        let rate = match (self.last_total, total) {
            (Some(last), Some(now)) => now.saturating_sub(last) / EVERY.as_secs(),
            _ => 0,
        };
        if total.is_some() {
            self.last_total = total;
        }
        if self.rates.len() == SAMPLES {
            self.rates.pop_front();
        }
        self.rates.push_back(rate);
    }

    fn is_quiet(&self) -> bool {
        self.rates.iter().all(|&r| r == 0)
    }
}

impl Traffic {
    /// Takes one sample: `totals` are the byte counters of the cameras online now. A
    /// camera offline gets zeros, and is forgotten once its window is all zeros.
    pub(crate) fn sample(&self, totals: impl IntoIterator<Item = (String, u64)>) {
        let mut cameras = self.cameras.lock().unwrap_or_else(|e| e.into_inner());
        let mut online: HashMap<String, u64> = totals.into_iter().collect();
        cameras.retain(|id, history| {
            let total = online.remove(id);
            let is_online = total.is_some();
            history.sample(total);
            is_online || !history.is_quiet()
        });
        for (id, total) in online {
            cameras.entry(id).or_default().sample(Some(total));
        }
    }

    /// Each camera with samples, sorted by id, with its bytes per second of each sample,
    /// oldest first.
    pub(crate) fn snapshot(&self) -> Vec<(String, Vec<u64>)> {
        let cameras = self.cameras.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<(String, Vec<u64>)> = cameras
            .iter()
            .map(|(id, h)| (id.clone(), h.rates.iter().copied().collect()))
            .collect();
        list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        list
    }

    /// Samples every [`EVERY`] until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, registry: Arc<Registry>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
            self.sample(registry.sessions().iter().map(|s| {
                let total = s.metrics.to_camera.get() + s.metrics.to_watcher.get();
                (s.id.clone(), total)
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Traffic {
        fn rates(&self, id: &str) -> Vec<u64> {
            self.snapshot()
                .into_iter()
                .find(|(camera, _)| camera == id)
                .map(|(_, rates)| rates)
                .unwrap_or_default()
        }
    }

    fn online(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(id, n)| (id.to_string(), *n)).collect()
    }

    #[test]
    fn rates_are_bytes_per_second_between_samples() {
        let t = Traffic::default();
        t.sample(online(&[("cam-1", 1_000)]));
        t.sample(online(&[("cam-1", 11_000)]));
        t.sample(online(&[("cam-1", 31_000)]));
        assert_eq!(t.rates("cam-1"), vec![0, 1_000, 2_000]);
        assert!(t.rates("cam-2").is_empty());
    }

    #[test]
    fn an_offline_camera_falls_to_zero_and_is_forgotten_after_a_quiet_window() {
        let t = Traffic::default();
        t.sample(online(&[("cam-1", 0)]));
        t.sample(online(&[("cam-1", 100_000)]));
        t.sample(online(&[]));
        assert_eq!(t.rates("cam-1"), vec![0, 10_000, 0]);
        // Back online: the counter went on meanwhile only by what it carried since.
        t.sample(online(&[("cam-1", 150_000)]));
        assert_eq!(t.rates("cam-1")[3], 5_000);
        for _ in 0..SAMPLES - 1 {
            t.sample(online(&[]));
        }
        assert_eq!(t.rates("cam-1").len(), SAMPLES);
        assert!(t.rates("cam-1").iter().any(|&r| r > 0));
        t.sample(online(&[]));
        assert!(
            t.rates("cam-1").is_empty(),
            "a quiet window of an offline camera is dropped"
        );
    }

    #[test]
    fn the_window_is_bounded() {
        let t = Traffic::default();
        for i in 0..(SAMPLES as u64 + 5) {
            t.sample(online(&[("cam-1", i * 10)]));
        }
        assert_eq!(t.rates("cam-1").len(), SAMPLES);
        assert!(t.rates("cam-1").iter().all(|&r| r == 1));
    }
}
