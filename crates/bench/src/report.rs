//! The result of a run: what the JSON file holds and what the summary prints. Figures only;
//! nothing here judges them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::machine::{CpuUse, Machine};
use crate::record::{Op, Outcome, Percentiles, Slot, ALL_OPS, OP_NAMES};

/// Everything one run measured. Serialized as the `--out` JSON file.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub scenario: String,
    /// `http` or `in_process`.
    pub mode: String,
    /// `sqlite` or `none` in process; over HTTP, whatever the server runs (`server`).
    pub store: String,
    pub url: Option<String>,
    pub started_at_unix_s: u64,
    pub config: RunConfig,
    pub elapsed_s: f64,
    pub requests: u64,
    pub requests_per_s: f64,
    /// Claims, when the scenario makes any.
    pub claims: Option<ClaimFigures>,
    /// Every kind of request, by name: `claim`, `send`, `history`, `healthz`.
    pub ops: BTreeMap<String, OpFigures>,
    pub storm: Option<StormFigures>,
    pub resident: Option<ResidentFigures>,
    /// How busy the CPUs were during the load, and who kept them busy.
    pub cpu: Option<CpuUse>,
    /// Over HTTP, from the server's `/metrics` before the load and after the audit: its CPU
    /// per request answered, in µs, by what its threads do (`tokio`: HTTP; `query`, `set`,
    /// `fold`, `checkpoint`, `other`) and `all`. After the audit, so on SQLite it holds the
    /// fold of every claim of the run. `None` in process, or from a server that does not say.
    pub server_cpu_us_per_request: Option<BTreeMap<String, f64>>,
    /// The same from before the load to its end, before the audit: what the server spent while
    /// the load ran, the CPU the load's rate had to share. A fold that gave way to the claims
    /// is in the figure above and not here.
    pub server_cpu_us_per_request_during_load: Option<BTreeMap<String, f64>>,
    /// One row per second of the run.
    pub timeline: Vec<Second>,
    /// The server's (or engine's) audit after the load, as it answered; `None` when skipped.
    pub audit: Option<serde_json::Value>,
    pub audit_ok: Option<bool>,
    /// The first few distinct error messages.
    pub errors_sample: Vec<String>,
    /// What a reader of the figures must know: skipped checks, modes not offered, warnings.
    pub notes: Vec<String>,
    pub machine: Machine,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub duration_s: u64,
    pub concurrency: usize,
    /// Claims per engine call (`--batch`); 1 is a call per claim.
    pub batch: usize,
    pub threads: usize,
    pub sets: u32,
    pub shares: u32,
    pub packets: u32,
    pub rate_per_s: Option<u64>,
    pub zipf_s: f64,
    pub history_per_mille: u32,
    /// Over HTTP, whether each connection answered one `/healthz` before the clock started.
    pub warmed_up: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClaimFigures {
    pub paid: u64,
    pub turned_away: u64,
    pub overloaded: u64,
    pub errors: u64,
    pub paid_fen: i64,
    pub paid_per_s: f64,
    /// Paid plus turned away: requests the service answered with a decision.
    pub handled_per_s: f64,
    pub latency: Percentiles,
    /// The server's own time for the same claims (HTTP `Server-Timing`); absent in process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_latency: Option<Percentiles>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpFigures {
    pub ok: u64,
    pub turned_away: u64,
    pub overloaded: u64,
    pub errors: u64,
    pub per_s: f64,
    pub ok_per_s: f64,
    pub latency: Percentiles,
    /// The server's own time for the same answers (HTTP `Server-Timing`); absent in process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_latency: Option<Percentiles>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StormFigures {
    pub packet_id: String,
    pub shares: u32,
    pub total_fen: i64,
    /// When the last share was paid, from the start of the load; `None` if it never was.
    pub emptied_after_s: Option<f64>,
    /// Shares over the time it took to empty the packet.
    pub paid_per_s_until_empty: Option<f64>,
    /// Requests turned away per second once the packet was empty: the late crowd.
    pub turned_away_per_s_after_empty: Option<f64>,
    /// Every share paid and the amounts add up to the packet's total.
    pub paid_fen_matches_total: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResidentFigures {
    pub packets: u32,
    pub shares_per_packet: u32,
    pub senders: u32,
    pub create_s: f64,
    pub packets_per_s: f64,
    pub rss_kib_before: u64,
    pub rss_kib_after_create: u64,
    pub rss_kib_peak: u64,
    /// Claims stored (on closed packets) after the memory was read and before the restart.
    pub stored_claims: u64,
    /// A fresh process that starts the engine on the same data dir.
    pub restart_ready_s: Option<f64>,
    pub restart_rss_kib: Option<u64>,
    /// The restarted engine's escrow equals every packet's total: all of them came back.
    pub restart_escrow_matches: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Second {
    pub t_s: u64,
    /// Of the scenario's main request (claims, or health checks for the ceiling).
    pub ok_per_s: u64,
    pub handled_per_s: u64,
    pub refused_per_s: u64,
    pub errors_per_s: u64,
    pub other_per_s: u64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub latency_us_max: u64,
    /// The server's own p99 for this second's answers, where it said (HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_latency_us_p99: Option<u64>,
}

impl OpFigures {
    fn of(total: &Slot, op: Op, elapsed_s: f64) -> OpFigures {
        OpFigures {
            ok: total.count(op, Outcome::Ok),
            turned_away: total.count(op, Outcome::Away),
            overloaded: total.count(op, Outcome::Overloaded),
            errors: total.count(op, Outcome::Error),
            per_s: rate(total.op_total(op), elapsed_s),
            ok_per_s: rate(total.count(op, Outcome::Ok), elapsed_s),
            latency: Percentiles::of(total.latency_us[op as usize].as_ref()),
            server_latency: server_percentiles(total, op),
        }
    }
}

/// Percentiles of the server's own times for `op`, if any answer carried one.
fn server_percentiles(slot: &Slot, op: Op) -> Option<Percentiles> {
    slot.server_us[op as usize].as_ref().filter(|h| !h.is_empty()).map(|h| Percentiles::of(Some(h)))
}

pub fn rate(count: u64, elapsed_s: f64) -> f64 {
    if elapsed_s > 0.0 {
        (count as f64 / elapsed_s * 10.0).round() / 10.0
    } else {
        0.0
    }
}

/// The ops table, claim figures and timeline of a finished load.
pub fn figures(
    total: &Slot,
    seconds: &[Slot],
    main: Op,
    elapsed_s: f64,
) -> (BTreeMap<String, OpFigures>, Option<ClaimFigures>, Vec<Second>) {
    let mut ops = BTreeMap::new();
    for (op, name) in ALL_OPS.into_iter().zip(OP_NAMES) {
        if total.op_total(op) > 0 {
            ops.insert(name.to_string(), OpFigures::of(total, op, elapsed_s));
        }
    }
    let claims = (total.op_total(Op::Claim) > 0).then(|| {
        let paid = total.count(Op::Claim, Outcome::Ok);
        let away = total.count(Op::Claim, Outcome::Away);
        ClaimFigures {
            paid,
            turned_away: away,
            overloaded: total.count(Op::Claim, Outcome::Overloaded),
            errors: total.count(Op::Claim, Outcome::Error),
            paid_fen: total.paid_fen,
            paid_per_s: rate(paid, elapsed_s),
            handled_per_s: rate(paid + away, elapsed_s),
            latency: Percentiles::of(total.latency_us[Op::Claim as usize].as_ref()),
            server_latency: server_percentiles(total, Op::Claim),
        }
    });
    let timeline = seconds
        .iter()
        .enumerate()
        .map(|(t, s)| {
            let p = Percentiles::of(s.latency_us[main as usize].as_ref());
            let ok = s.count(main, Outcome::Ok);
            Second {
                t_s: t as u64,
                ok_per_s: ok,
                handled_per_s: ok + s.count(main, Outcome::Away),
                refused_per_s: s.count(main, Outcome::Overloaded),
                errors_per_s: s.count(main, Outcome::Error),
                other_per_s: s.requests() - s.op_total(main),
                latency_us_p50: p.latency_us_p50,
                latency_us_p99: p.latency_us_p99,
                latency_us_max: p.latency_us_max,
                server_latency_us_p99: server_percentiles(s, main).map(|p| p.latency_us_p99),
            }
        })
        .collect();
    (ops, claims, timeline)
}

/// `latency ms p50 … p99 … p99.9 … max …`, as the summary prints every latency.
fn latencies(l: &Percentiles) -> String {
    format!(
        "latency ms p50 {} p99 {} p99.9 {} max {}",
        ms(l.latency_us_p50),
        ms(l.latency_us_p99),
        ms(l.latency_us_p999),
        ms(l.latency_us_max)
    )
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// 1234567.8 → "1,234,568".
pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let groups: Vec<&str> =
        digits.as_bytes().rchunks(3).rev().map(|g| std::str::from_utf8(g).expect("ASCII digits")).collect();
    let out = groups.join(",");
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

impl BenchResult {
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
    }

    /// A few lines for a person.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let _ = writeln!(
            s,
            "{} ({}, store {}, {} sets): {:.1} s, concurrency {}{}, {} threads{}",
            self.scenario,
            self.mode,
            self.store,
            c.sets,
            self.elapsed_s,
            c.concurrency,
            if c.batch > 1 { format!(" calls of {} claims", c.batch) } else { String::new() },
            c.threads,
            c.rate_per_s.map(|r| format!(", open loop at {r}/s")).unwrap_or_default()
        );
        if c.warmed_up {
            let _ = writeln!(s, "  each connection answered one /healthz before the clock started");
        }
        if let Some(cpu) = &self.cpu {
            let _ = writeln!(
                s,
                "  cpu: machine {:.0} % busy; this process {:.2} cores, everything else {:.2} cores (load average before {:.2})",
                cpu.machine_busy_fraction * 100.0,
                cpu.own_cores,
                cpu.others_cores,
                cpu.loadavg_1m_before
            );
        }
        if let Some(per) = &self.server_cpu_us_per_request {
            let _ = writeln!(s, "  server cpu per request: {}", cpu_line(per));
        }
        if let Some(per) = &self.server_cpu_us_per_request_during_load {
            let _ = writeln!(s, "  … of it during the load: {}", cpu_line(per));
        }
        if let Some(k) = &self.claims {
            let _ = writeln!(
                s,
                "  claims: paid {}  turned away {}  overloaded {}  errors {}",
                thousands(k.paid as f64),
                thousands(k.turned_away as f64),
                thousands(k.overloaded as f64),
                thousands(k.errors as f64)
            );
            let _ = writeln!(
                s,
                "  claims paid/s {}   handled/s {}",
                thousands(k.paid_per_s),
                thousands(k.handled_per_s)
            );
        }
        for (name, op) in &self.ops {
            let _ = writeln!(
                s,
                "  {name:<8} {:>10}/s  ok {:>10}  refused {:>6}  errors {:>6}  {}",
                thousands(op.per_s),
                thousands(op.ok as f64),
                thousands(op.overloaded as f64),
                thousands(op.errors as f64),
                latencies(&op.latency)
            );
            if let Some(l) = &op.server_latency {
                let _ = writeln!(
                    s,
                    "  {:<8} {:>58}  {}",
                    "",
                    "of which in the server (Server-Timing):",
                    latencies(l)
                );
            }
        }
        if let Some(st) = &self.storm {
            match st.emptied_after_s {
                Some(t) => {
                    let _ = writeln!(
                        s,
                        "  packet of {} shares emptied after {:.2} s ({} paid/s), then {} turned away/s; \
                         amounts add up: {}",
                        thousands(f64::from(st.shares)),
                        t,
                        thousands(st.paid_per_s_until_empty.unwrap_or(0.0)),
                        thousands(st.turned_away_per_s_after_empty.unwrap_or(0.0)),
                        st.paid_fen_matches_total
                    );
                }
                None => {
                    let _ = writeln!(s, "  packet of {} shares not emptied", thousands(f64::from(st.shares)));
                }
            }
        }
        if let Some(r) = &self.resident {
            let _ = writeln!(
                s,
                "  {} packets of {} shares created in {:.1} s ({}/s); RSS {} MiB (before {} MiB, peak {} MiB)",
                thousands(f64::from(r.packets)),
                r.shares_per_packet,
                r.create_s,
                thousands(r.packets_per_s),
                r.rss_kib_after_create / 1024,
                r.rss_kib_before / 1024,
                r.rss_kib_peak / 1024
            );
            if let Some(t) = r.restart_ready_s {
                let _ = writeln!(
                    s,
                    "  restart on the same data dir: ready in {:.2} s, RSS {} MiB, every packet back: {}",
                    t,
                    r.restart_rss_kib.unwrap_or(0) / 1024,
                    r.restart_escrow_matches.map_or("unknown".to_string(), |b| b.to_string())
                );
            }
        }
        match self.audit_ok {
            Some(ok) => {
                let _ = writeln!(s, "  audit: {}", if ok { "ok" } else { "FAILED" });
            }
            None => {
                let _ = writeln!(s, "  audit: skipped");
            }
        }
        for e in &self.errors_sample {
            let _ = writeln!(s, "  error: {e}");
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        s
    }
}

/// The order the server's thread kinds are printed in; kinds it adds later follow.
const THREAD_KINDS: [&str; 6] = ["tokio", "query", "set", "fold", "checkpoint", "other"];

/// The server's CPU per request, in µs, by thread kind and in `all`: the growth of each of
/// its counters between two reads of `/metrics`, over the `requests` answered in between.
pub fn cpu_per_request_us(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    requests: u64,
) -> Option<BTreeMap<String, f64>> {
    if requests == 0 {
        return None;
    }
    let per = |seconds: f64| (seconds.max(0.0) * 1e6 / requests as f64 * 100.0).round() / 100.0;
    let grown: Vec<(&String, f64)> =
        after.iter().map(|(kind, &s)| (kind, s - before.get(kind).copied().unwrap_or(0.0))).collect();
    let all = grown.iter().map(|(_, s)| s).sum();
    let mut out: BTreeMap<String, f64> = grown.into_iter().map(|(kind, s)| (kind.clone(), per(s))).collect();
    out.insert("all".into(), per(all));
    Some(out)
}

/// `tokio 27.19, set 7.50, …, all 49.20 µs`.
fn cpu_line(per: &BTreeMap<String, f64>) -> String {
    let known = THREAD_KINDS.iter().filter_map(|k| per.get_key_value(*k));
    let more = per.iter().filter(|(k, _)| !THREAD_KINDS.contains(&k.as_str()) && *k != "all");
    let mut parts: Vec<String> = known.chain(more).map(|(k, v)| format!("{k} {v:.2}")).collect();
    if let Some(all) = per.get("all") {
        parts.push(format!("all {all:.2}"));
    }
    format!("{} µs", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BenchResult {
        let mut slot = Slot::default();
        slot.counts[Op::Claim as usize][Outcome::Ok as usize] = 10;
        slot.counts[Op::Claim as usize][Outcome::Away as usize] = 5;
        slot.paid_fen = 1000;
        let (ops, claims, timeline) = figures(&slot, std::slice::from_ref(&slot), Op::Claim, 2.0);
        BenchResult {
            scenario: "storm".into(),
            mode: "in_process".into(),
            store: "sqlite".into(),
            url: None,
            started_at_unix_s: 0,
            config: RunConfig {
                duration_s: 2,
                concurrency: 4,
                batch: 1,
                threads: 1,
                sets: 1,
                shares: 10,
                packets: 1,
                rate_per_s: None,
                zipf_s: 1.0,
                history_per_mille: 0,
                warmed_up: false,
            },
            elapsed_s: 2.0,
            requests: 15,
            requests_per_s: 7.5,
            claims,
            ops,
            storm: None,
            resident: None,
            cpu: None,
            server_cpu_us_per_request: None,
            server_cpu_us_per_request_during_load: None,
            timeline,
            audit: Some(serde_json::json!({"ok": true})),
            audit_ok: Some(true),
            errors_sample: vec![],
            notes: vec![],
            machine: Machine::default(),
        }
    }

    #[test]
    fn the_servers_own_times_are_reported_where_it_gave_them() {
        let of = |values: [u64; 3]| {
            let mut h = crate::record::new_histogram();
            values.iter().for_each(|&us| h.record(us).unwrap());
            Some(h)
        };
        let mut slot = Slot::default();
        slot.counts[Op::Claim as usize][Outcome::Ok as usize] = 3;
        slot.latency_us[Op::Claim as usize] = of([900, 1_000, 1_100]);
        // In process nothing says: no server figures at all.
        let (ops, claims, timeline) = figures(&slot, std::slice::from_ref(&slot), Op::Claim, 1.0);
        let claims = serde_json::to_value(claims.unwrap()).unwrap();
        assert!(claims.get("server_latency").is_none());
        assert!(serde_json::to_value(&ops["claim"]).unwrap().get("server_latency").is_none());
        assert!(serde_json::to_value(&timeline[0]).unwrap().get("server_latency_us_p99").is_none());
        // Over HTTP each answer's Server-Timing lands beside its latency.
        slot.server_us[Op::Claim as usize] = of([200, 300, 400]);
        let (ops, claims, timeline) = figures(&slot, std::slice::from_ref(&slot), Op::Claim, 1.0);
        let server = claims.unwrap().server_latency.expect("server times");
        assert_eq!(server.count, 3);
        assert!((399..=401).contains(&server.latency_us_max), "{server:?}");
        assert_eq!(ops["claim"].server_latency, Some(server));
        assert_eq!(timeline[0].server_latency_us_p99, Some(server.latency_us_p99));
    }

    #[test]
    fn the_servers_cpu_is_divided_by_the_requests_and_printed_in_order() {
        let at = |pairs: &[(&str, f64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let before = at(&[("tokio", 10.0), ("set", 1.0), ("fold", 2.0), ("other", 0.5)]);
        // A kind the bench does not know is kept; one missing before counts from zero.
        let after = at(&[("tokio", 12.7), ("set", 1.5), ("fold", 3.0), ("other", 0.5), ("new", 0.1)]);
        let per = cpu_per_request_us(&before, &after, 100_000).expect("requests");
        assert_eq!(per["tokio"], 27.0);
        assert_eq!(per["set"], 5.0);
        assert_eq!(per["fold"], 10.0);
        assert_eq!(per["other"], 0.0);
        assert_eq!(per["new"], 1.0);
        assert_eq!(per["all"], 43.0);
        assert_eq!(cpu_per_request_us(&before, &after, 0), None);
        let mut r = sample();
        r.server_cpu_us_per_request = Some(per);
        assert!(
            r.summary().contains(
                "server cpu per request: tokio 27.00, set 5.00, fold 10.00, other 0.00, new 1.00, all 43.00 µs"
            ),
            "{}",
            r.summary()
        );
        assert!(!r.summary().contains("during the load"), "{}", r.summary());
        // The fold put off until after the load is in the first line only.
        let at_end = at(&[("tokio", 12.7), ("set", 1.5), ("fold", 2.0), ("other", 0.5)]);
        r.server_cpu_us_per_request_during_load = cpu_per_request_us(&before, &at_end, 100_000);
        assert!(
            r.summary().contains(
                "… of it during the load: tokio 27.00, set 5.00, fold 0.00, other 0.00, all 32.00 µs"
            ),
            "{}",
            r.summary()
        );
    }

    #[test]
    fn result_json_has_the_fields_scripts_read() {
        let v = serde_json::to_value(sample()).unwrap();
        for key in [
            "scenario",
            "mode",
            "store",
            "config",
            "elapsed_s",
            "claims",
            "ops",
            "timeline",
            "audit_ok",
            "machine",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["claims"]["paid"], 10);
        assert_eq!(v["claims"]["paid_per_s"], 5.0);
        assert_eq!(v["claims"]["handled_per_s"], 7.5);
        for key in ["latency_us_p50", "latency_us_p99", "latency_us_p999", "latency_us_max"] {
            assert!(v["claims"]["latency"].get(key).is_some(), "missing latency {key}");
        }
        assert_eq!(v["ops"]["claim"]["turned_away"], 5);
        assert_eq!(v["timeline"][0]["ok_per_s"], 10);
        assert_eq!(v["timeline"][0]["handled_per_s"], 15);
        for key in ["nproc", "cpu_model", "mem_total_kib", "kernel"] {
            assert!(v["machine"].get(key).is_some(), "missing machine {key}");
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234567.8), "1,234,568");
        assert_eq!(thousands(-1000.0), "-1,000");
    }
}
