//! Counting every answer and its latency without making the load generator the bottleneck.
//!
//! Each load thread records into its own thread-local counters and HDR histograms (no lock,
//! no atomic, no allocation per request). When a thread sees that a second of the run has
//! passed, it adds what it gathered into that second's slot of the shared timeline, under a
//! mutex taken about once a second per thread. The run's totals are the sum of the timeline.
//!
//! Each load thread flushes its leftovers when its tasks are done (see [`flush_thread`]); the
//! drivers check the timeline's totals against counts their tasks kept themselves, so a lost
//! flush shows up as a warning rather than as a quietly smaller figure.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::Answer;

/// Highest latency a histogram holds: longer ones are recorded as this. Requests time out
/// well before it (see `http::REQUEST_TIMEOUT`).
pub const LATENCY_US_MAX: u64 = 60_000_000;
/// Significant figures of every latency histogram: 0.1 % resolution.
const LATENCY_SIGFIG: u8 = 3;
/// Most error messages kept for the report: enough to tell what went wrong, bounded.
const ERROR_SAMPLES_MAX: usize = 10;

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Claim = 0,
    Send = 1,
    History = 2,
    Health = 3,
}

pub const OPS: usize = 4;
/// Every kind, in the order of their numbers and of [`OP_NAMES`].
pub const ALL_OPS: [Op; OPS] = [Op::Claim, Op::Send, Op::History, Op::Health];
pub const OP_NAMES: [&str; OPS] = ["claim", "send", "history", "healthz"];

/// How it ended. `Ok` is a paid claim, a created packet, a served query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok = 0,
    /// Turned away: the packet is exhausted or expired (410).
    Away = 1,
    /// Refused because the service is saturated (503).
    Overloaded = 2,
    /// Anything else: a transport error, a timeout, an unexpected status.
    Error = 3,
}

pub const OUTCOMES: usize = 4;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIG).expect("valid histogram bounds")
}

/// Counts and latencies of one second of the run (or of the whole run).
#[derive(Debug, Clone)]
pub struct Slot {
    pub counts: [[u64; OUTCOMES]; OPS],
    /// Fen paid by the claims counted here.
    pub paid_fen: i64,
    /// One histogram per op, made on first use.
    pub latency_us: [Option<Histogram<u64>>; OPS],
    /// The server's own time for the same answers, where it said (HTTP `Server-Timing`).
    pub server_us: [Option<Histogram<u64>>; OPS],
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            counts: [[0; OUTCOMES]; OPS],
            paid_fen: 0,
            latency_us: [None, None, None, None],
            server_us: [None, None, None, None],
        }
    }
}

impl Slot {
    pub fn count(&self, op: Op, outcome: Outcome) -> u64 {
        self.counts[op as usize][outcome as usize]
    }

    pub fn op_total(&self, op: Op) -> u64 {
        self.counts[op as usize].iter().sum()
    }

    pub fn requests(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    fn add(&mut self, other: &Slot) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        self.paid_fen += other.paid_fen;
        for (mine, theirs) in self
            .latency_us
            .iter_mut()
            .zip(&other.latency_us)
            .chain(self.server_us.iter_mut().zip(&other.server_us))
        {
            if let Some(h) = theirs {
                mine.get_or_insert_with(new_histogram).add(h).expect("histograms of equal bounds add");
            }
        }
    }
}

/// The run's timeline, shared by every recording thread.
#[derive(Debug)]
pub struct Recorder {
    pub start: Instant,
    /// One slot per second since `start`. Locked about once a second per thread, and by the
    /// progress display; never held across `.await`.
    seconds: Mutex<Vec<Slot>>,
    errors: Mutex<Vec<String>>,
}

impl Recorder {
    pub fn new(start: Instant) -> Arc<Recorder> {
        Arc::new(Recorder { start, seconds: Mutex::new(Vec::new()), errors: Mutex::new(Vec::new()) })
    }

    /// Counts one answer. Called on the thread that saw it; `now` is when it arrived.
    pub fn record(
        self: &Arc<Recorder>,
        op: Op,
        outcome: Outcome,
        latency: Duration,
        paid_fen: i64,
        now: Instant,
    ) {
        self.with_slot(now, |slot| {
            slot.counts[op as usize][outcome as usize] += 1;
            slot.paid_fen += paid_fen;
            slot.latency_us[op as usize].get_or_insert_with(new_histogram).saturating_record(micros(latency));
        });
    }

    /// Counts the answers of one batched call, which all arrived at `now` after `latency`: as
    /// [`Recorder::record`] would count each, but with one visit to this thread's slot and one
    /// histogram update for the call, not one a claim (the load thread's time is taken from
    /// the engine's in the memory-only festival).
    pub fn record_many(self: &Arc<Recorder>, op: Op, answers: &[Answer], latency: Duration, now: Instant) {
        if answers.is_empty() {
            return;
        }
        self.with_slot(now, |slot| {
            for a in answers {
                slot.counts[op as usize][a.outcome() as usize] += 1;
                slot.paid_fen += a.paid_fen();
            }
            let n = answers.len() as u64;
            slot.latency_us[op as usize]
                .get_or_insert_with(new_histogram)
                .saturating_record_n(micros(latency), n);
        });
    }

    /// Records the server's own time for an answer just counted by [`Recorder::record`], with
    /// the same `now`; nothing when the answer did not carry one (in process, or no answer).
    pub fn record_server(self: &Arc<Recorder>, op: Op, took: Option<Duration>, now: Instant) {
        let Some(took) = took else { return };
        self.with_slot(now, |slot| {
            slot.server_us[op as usize].get_or_insert_with(new_histogram).saturating_record(micros(took));
        });
    }

    /// Runs `f` on this thread's slot for the second `now` falls in, flushing the last one into
    /// the timeline when the second (or the run) changed.
    fn with_slot(self: &Arc<Recorder>, now: Instant, f: impl FnOnce(&mut Slot)) {
        let second = now.saturating_duration_since(self.start).as_secs() as usize;
        LOCAL.with(|cell| {
            let mut local = cell.borrow_mut();
            let same_run = local.sink.as_ref().is_some_and(|s| Arc::ptr_eq(s, self));
            if !same_run || second != local.second {
                local.flush();
                local.sink = Some(self.clone());
                local.second = second;
            }
            f(&mut local.slot);
        });
    }

    /// Keeps the first few error messages for the report.
    pub fn error_sample(&self, message: &str) {
        let mut errors = self.errors.lock().expect("errors lock");
        if errors.len() < ERROR_SAMPLES_MAX && !errors.iter().any(|e| e == message) {
            errors.push(message.to_string());
        }
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors lock").clone()
    }

    /// The timeline so far: slot k covers seconds [k, k + 1) of the run.
    pub fn seconds(&self) -> Vec<Slot> {
        self.seconds.lock().expect("timeline lock").clone()
    }

    /// Counts only, for the progress display: cheap, no histograms copied.
    pub fn counts(&self) -> (Slot, Option<Slot>) {
        let seconds = self.seconds.lock().expect("timeline lock");
        let mut total = Slot::default();
        for s in seconds.iter() {
            total.counts = add_counts(total.counts, s.counts);
            total.paid_fen += s.paid_fen;
        }
        let last_full = seconds.len().checked_sub(2).map(|k| {
            let s = &seconds[k];
            Slot { counts: s.counts, paid_fen: s.paid_fen, ..Slot::default() }
        });
        (total, last_full)
    }

    /// The whole run: the sum of every second.
    pub fn total(&self) -> Slot {
        let mut total = Slot::default();
        for s in self.seconds.lock().expect("timeline lock").iter() {
            total.add(s);
        }
        total
    }

    fn merge(&self, second: usize, slot: &Slot) {
        let mut seconds = self.seconds.lock().expect("timeline lock");
        if seconds.len() <= second {
            seconds.resize_with(second + 1, Slot::default);
        }
        seconds[second].add(slot);
    }
}

/// A latency as a histogram value: microseconds, within the histogram's bounds.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, LATENCY_US_MAX)
}

fn add_counts(a: [[u64; OUTCOMES]; OPS], b: [[u64; OUTCOMES]; OPS]) -> [[u64; OUTCOMES]; OPS] {
    let mut out = a;
    for (o, row) in out.iter_mut().zip(b) {
        for (x, y) in o.iter_mut().zip(row) {
            *x += y;
        }
    }
    out
}

/// Adds what this thread gathered into the shared timeline. Load threads call it when their
/// tasks are done; calling it again is harmless.
pub fn flush_thread() {
    LOCAL.with(|cell| cell.borrow_mut().flush());
}

/// One thread's share of the current second. Owned by its thread alone.
struct Local {
    sink: Option<Arc<Recorder>>,
    second: usize,
    slot: Slot,
}

impl Local {
    fn flush(&mut self) {
        let Some(sink) = &self.sink else { return };
        if self.slot.requests() > 0 {
            sink.merge(self.second, &self.slot);
            self.slot.counts = [[0; OUTCOMES]; OPS];
            self.slot.paid_fen = 0;
            // Reset rather than drop: the next second reuses the allocation.
            for h in self.slot.latency_us.iter_mut().chain(self.slot.server_us.iter_mut()).flatten() {
                h.reset();
            }
        }
    }
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local { sink: None, second: 0, slot: Slot::default() });
}

/// Latency percentiles of a histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub latency_us_p999: u64,
    pub latency_us_max: u64,
    pub latency_us_mean: f64,
}

impl Percentiles {
    pub fn of(h: Option<&Histogram<u64>>) -> Percentiles {
        match h {
            Some(h) if !h.is_empty() => Percentiles {
                count: h.len(),
                latency_us_p50: h.value_at_quantile(0.50),
                latency_us_p99: h.value_at_quantile(0.99),
                latency_us_p999: h.value_at_quantile(0.999),
                latency_us_max: h.max(),
                latency_us_mean: (h.mean() * 10.0).round() / 10.0,
            },
            _ => Percentiles::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_land_in_their_second_and_sum_to_the_total() {
        let start = Instant::now();
        let rec = Recorder::new(start);
        rec.record(Op::Claim, Outcome::Ok, Duration::from_micros(900), 150, start);
        rec.record(
            Op::Claim,
            Outcome::Away,
            Duration::from_micros(100),
            0,
            start + Duration::from_millis(10),
        );
        // Crossing into the next second flushes the first one.
        rec.record(Op::Send, Outcome::Ok, Duration::from_millis(3), 0, start + Duration::from_millis(1500));
        flush_thread();
        let seconds = rec.seconds();
        assert_eq!(seconds.len(), 2);
        assert_eq!(seconds[0].count(Op::Claim, Outcome::Ok), 1);
        assert_eq!(seconds[0].count(Op::Claim, Outcome::Away), 1);
        assert_eq!(seconds[1].count(Op::Send, Outcome::Ok), 1);
        let total = rec.total();
        assert_eq!(total.requests(), 3);
        assert_eq!(total.paid_fen, 150);
        let p = Percentiles::of(total.latency_us[Op::Claim as usize].as_ref());
        assert_eq!(p.count, 2);
        assert!(p.latency_us_max >= 899 && p.latency_us_max <= 901);
    }

    #[test]
    fn a_batch_is_counted_as_each_of_its_answers_would_be() {
        let start = Instant::now();
        let answers = [
            Answer::Paid(120),
            Answer::Away,
            Answer::Paid(30),
            Answer::Overloaded,
            Answer::Error("x".into()),
        ];
        let (each, many) = (Recorder::new(start), Recorder::new(start));
        let (latency, now) = (Duration::from_micros(2_500), start + Duration::from_millis(20));
        for a in &answers {
            each.record(Op::Claim, a.outcome(), latency, a.paid_fen(), now);
        }
        many.record_many(Op::Claim, &answers, latency, now);
        many.record_many(Op::Claim, &[], latency, now);
        flush_thread();
        let (each, many) = (each.total(), many.total());
        for outcome in [Outcome::Ok, Outcome::Away, Outcome::Overloaded, Outcome::Error] {
            assert_eq!(many.count(Op::Claim, outcome), each.count(Op::Claim, outcome), "{outcome:?}");
        }
        assert_eq!(many.count(Op::Claim, Outcome::Ok), 2);
        assert_eq!(many.paid_fen, 150);
        let (pe, pm) = (
            Percentiles::of(each.latency_us[Op::Claim as usize].as_ref()),
            Percentiles::of(many.latency_us[Op::Claim as usize].as_ref()),
        );
        assert_eq!(
            (pm.count, pm.latency_us_p99, pm.latency_us_max),
            (5, pe.latency_us_p99, pe.latency_us_max)
        );
    }
}
