//! CPU time and memory of the tunnels' processes, from /proc.

use serde::Serialize;

/// Clock ticks per second of /proc/<pid>/stat (USER_HZ: 100 on every Linux port).
const TICKS_PER_SEC: f64 = 100.0;

/// A process's CPU seconds so far (user + system), or None if it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / TICKS_PER_SEC)
}

/// A process's resident memory in KiB (VmRSS), or None if it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU seconds and peak memory of one side of a path over a scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// CPU seconds spent during the scenario, summed over the side's processes.
    pub cpu_seconds: f64,
    /// Resident memory at the end, summed over the side's processes, KiB.
    pub rss_kib: u64,
}

/// Snapshot of a set of processes' CPU time, to subtract later.
#[derive(Debug, Clone)]
pub struct Meter {
    pids: Vec<u32>,
    start: f64,
}

impl Meter {
    /// Starts counting for `pids`.
    pub fn start(pids: Vec<u32>) -> Self {
        let start = pids.iter().filter_map(|&p| cpu_seconds(p)).sum();
        Meter { pids, start }
    }

    /// CPU seconds since [`Meter::start`], and memory now.
    pub fn stop(&self) -> Usage {
        let now: f64 = self.pids.iter().filter_map(|&p| cpu_seconds(p)).sum();
        Usage {
            cpu_seconds: now - self.start,
            rss_kib: self.pids.iter().filter_map(|&p| rss_kib(p)).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_seconds(me).is_some_and(|s| s > 0.0));
        assert!(rss_kib(me).is_some_and(|k| k > 100));
        assert_eq!(cpu_seconds(u32::MAX), None);
    }
}
