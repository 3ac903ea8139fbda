//! What machine a figure was measured on, and how much memory this process holds. Linux
//! `/proc` files; on another system the fields stay empty rather than failing the run.

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
    pub kernel: String,
}

impl Machine {
    pub fn here() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            mem_total_kib: kib_field(&meminfo, "MemTotal:").unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// CPU time counters, to tell how busy the machine was during a run and how much of it this
/// process (the load generator, and in process the engine too) took.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    /// Every CPU's busy and total time since boot, in clock ticks.
    busy_ticks: u64,
    total_ticks: u64,
    /// This process's user and system time, in clock ticks.
    own_ticks: u64,
}

/// Linux reports these counters in USER_HZ ticks, 100 a second on every common platform.
const TICKS_PER_S: f64 = 100.0;

impl CpuSample {
    pub fn now() -> CpuSample {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect())
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
        let total_ticks: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and stime are the 12th
        // and 13th.
        let after = own.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = after.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
        CpuSample { busy_ticks: total_ticks - idle, total_ticks, own_ticks: f.iter().sum() }
    }
}

/// How the CPUs were used between two samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuUse {
    /// Busy share of all CPUs, 0 to 1: near 1 means the machine was saturated.
    pub machine_busy_fraction: f64,
    /// CPUs this process kept busy on average (the client over HTTP; client and engine in
    /// process).
    pub own_cores: f64,
    /// Everyone else's busy CPUs: the server over HTTP, plus whatever else ran on the machine.
    pub others_cores: f64,
    /// The 1-minute load average when the run started.
    pub loadavg_1m_before: f64,
}

impl CpuUse {
    pub fn between(a: CpuSample, b: CpuSample, loadavg_1m_before: f64) -> CpuUse {
        let total = b.total_ticks.saturating_sub(a.total_ticks) as f64;
        let busy = b.busy_ticks.saturating_sub(a.busy_ticks) as f64;
        let own = b.own_ticks.saturating_sub(a.own_ticks) as f64;
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        // Wall time covered, from the machine-wide counters (they advance `cpus` ticks a tick).
        let wall_s = total / cpus / TICKS_PER_S;
        let round = |v: f64| (v * 100.0).round() / 100.0;
        if wall_s <= 0.0 {
            return CpuUse { loadavg_1m_before, ..CpuUse::default() };
        }
        CpuUse {
            machine_busy_fraction: round(busy / total),
            own_cores: round(own / TICKS_PER_S / wall_s),
            others_cores: round(((busy - own) / TICKS_PER_S / wall_s).max(0.0)),
            loadavg_1m_before,
        }
    }
}

pub fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// This process's resident memory now (`VmRSS`) and at its peak (`VmHWM`), in KiB.
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    (kib_field(&status, "VmRSS:").unwrap_or(0), kib_field(&status, "VmHWM:").unwrap_or(0))
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)).and_then(|r| r.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let status = "Name:\tbench\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(1024));
        assert_eq!(kib_field(status, "VmHWM:"), Some(2048));
        assert_eq!(kib_field(status, "VmSwap:"), None);
    }
}
