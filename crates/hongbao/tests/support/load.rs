//! Load for the storm and crash tests: a random plan of packets and claimers, a work queue of
//! claim attempts, and client tasks that drain it and record every answer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use reqwest::Method;
use serde_json::json;

use super::{Api, API_KEY};

/// One packet to send, and who will try to claim it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sender: String,
    pub kind: &'static str,
    pub total: i64,
    pub count: i64,
    /// The group, or `None` for anyone.
    pub group: Option<Vec<String>>,
    /// Who tries to claim (each once; duplicates are added to the attempts separately).
    pub claimers: Vec<String>,
}

impl Plan {
    pub fn group_set(&self) -> Option<HashSet<String>> {
        self.group.as_ref().map(|g| g.iter().cloned().collect())
    }
}

pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:04}")).collect()
}

/// `packets` packets from `senders` in turn: every `anyone_every`-th is for anyone (claimed by
/// more users than it has shares), the others go to random groups of 2 to `group_max` users,
/// every member of which tries to claim. About a third are `equal`.
pub fn plan_packets(
    rng: &mut StdRng,
    senders: &[String],
    users: &[String],
    packets: usize,
    group_max: usize,
    anyone_every: usize,
) -> Vec<Plan> {
    (0..packets)
        .map(|i| {
            let sender = senders[i % senders.len()].clone();
            let kind = if rng.random_bool(0.35) { "equal" } else { "lucky" };
            let (count, group, claimers) = if i % anyone_every == 0 {
                let count = rng.random_range(1..=group_max / 2);
                let tries = (count + rng.random_range(0..=group_max / 2)).min(group_max);
                let claimers: Vec<String> = users.choose_multiple(rng, tries).cloned().collect();
                (count as i64, None, claimers)
            } else {
                let size = rng.random_range(2..=group_max);
                let group: Vec<String> = users.choose_multiple(rng, size).cloned().collect();
                let count = if rng.random_bool(0.3) { size } else { rng.random_range(1..=size) };
                (count as i64, Some(group.clone()), group)
            };
            let per_share = rng.random_range(1..=200_i64);
            let total = match kind {
                "equal" => count * per_share,
                _ => count * per_share + rng.random_range(0..count),
            };
            Plan { sender, kind, total, count, group, claimers }
        })
        .collect()
}

/// Deposits into each sender's wallet what its packets need plus a little; returns the
/// deposits by sender.
pub async fn fund_senders(api: &Api, plans: &[Plan], rng: &mut StdRng) -> HashMap<String, i64> {
    let mut need: HashMap<String, i64> = HashMap::new();
    for p in plans {
        *need.entry(p.sender.clone()).or_insert(0) += p.total;
    }
    for amount in need.values_mut() {
        *amount += rng.random_range(0..1_000);
    }
    let mut tasks = Vec::new();
    for (sender, amount) in need.clone() {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            assert_eq!(api.deposit_ok(&sender, amount).await, amount, "deposit to {sender}");
        }));
    }
    for t in tasks {
        t.await.expect("deposit task");
    }
    need
}

/// Sends every planned packet, `width` at a time; returns the ids in plan order.
pub async fn send_all(api: &Api, plans: &[Plan], width: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(plans.len());
    for chunk in plans.chunks(width) {
        let mut tasks = Vec::new();
        for p in chunk {
            let api = api.clone();
            let audience = match &p.group {
                Some(g) => json!({ "users": g }),
                None => json!({ "anyone": true }),
            };
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                api.send_ok(&p.sender, p.kind, p.total, p.count, audience).await
            }));
        }
        for t in tasks {
            ids.push(t.await.expect("send task"));
        }
    }
    ids
}

/// Every claimer of every packet once, plus `dup_percent`% asked twice, shuffled.
pub fn attempts(rng: &mut StdRng, plans: &[Plan], dup_percent: u32) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        for u in &p.claimers {
            out.push((i, u.clone()));
            if rng.random_ratio(dup_percent, 100) {
                out.push((i, u.clone()));
            }
        }
    }
    out.shuffle(rng);
    out
}

/// Claim attempts still to make, shared by the client tasks.
pub struct Work {
    queue: Mutex<VecDeque<(usize, String)>>,
    /// Answers (200 or 410) received since the last `reset_answered`.
    answered: AtomicUsize,
}

impl Work {
    pub fn new(items: Vec<(usize, String)>) -> Arc<Work> {
        Arc::new(Work { queue: Mutex::new(items.into()), answered: AtomicUsize::new(0) })
    }

    fn pop(&self) -> Option<(usize, String)> {
        self.queue.lock().expect("work lock").pop_front()
    }

    pub fn push_front(&self, items: impl IntoIterator<Item = (usize, String)>) {
        let mut q = self.queue.lock().expect("work lock");
        for it in items {
            q.push_front(it);
        }
    }

    pub fn len(&self) -> usize {
        self.queue.lock().expect("work lock").len()
    }

    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    pub fn reset_answered(&self) {
        self.answered.store(0, Ordering::Relaxed);
    }
}

/// What the client tasks saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// 200: (packet index, user, amount).
    pub paid: Vec<(usize, String, i64)>,
    /// 410 packet_exhausted: (packet index, user).
    pub exhausted: Vec<(usize, String)>,
    /// No answer (the server died): (packet index, user). Their fate is unknown.
    pub unknown: Vec<(usize, String)>,
    /// 429 and 503 answers, retried.
    pub shed: u64,
    /// Anything else, described.
    pub unexpected: Vec<String>,
}

impl Outcome {
    pub fn merge(&mut self, other: Outcome) {
        self.paid.extend(other.paid);
        self.exhausted.extend(other.exhausted);
        self.unknown.extend(other.unknown);
        self.shed += other.shed;
        self.unexpected.extend(other.unexpected);
    }

    pub fn requests_answered(&self) -> usize {
        self.paid.len() + self.exhausted.len() + self.unexpected.len()
    }
}

/// Runs `clients` tasks on one shared HTTP client until the work is done, or, for a task
/// whose request gets no answer, until that moment (the server is presumed dead).
pub async fn run_claims(api: &Api, ids: Arc<Vec<String>>, work: Arc<Work>, clients: usize) -> Outcome {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let api = api.clone();
        let ids = ids.clone();
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            while let Some((p, user)) = work.pop() {
                let body = json!({ "user": user });
                // Every third user grabs first and then opens; the rest claim in one call.
                let two_step = user.bytes().map(u32::from).sum::<u32>() % 3 == 0;
                let path = if two_step {
                    let grab = format!("/v1/packets/{}/grab", ids[p]);
                    match api.try_call(Method::POST, &grab, Some(API_KEY), Some(&body)).await {
                        Err(_) => {
                            out.unknown.push((p, user));
                            break;
                        }
                        Ok(r) if r.status == 200 && r.body["status"] == "opened" => {
                            // Opened before (e.g. before a crash): the grab names the share.
                            work.answered.fetch_add(1, Ordering::Relaxed);
                            match r.body["amount"].as_i64() {
                                Some(a) => out.paid.push((p, user, a)),
                                None => out.unexpected.push(format!("POST {grab} {body}: 200 {}", r.body)),
                            }
                            continue;
                        }
                        Ok(_) => format!("/v1/packets/{}/open", ids[p]),
                    }
                } else {
                    format!("/v1/packets/{}/claim", ids[p])
                };
                match api.try_call(Method::POST, &path, Some(API_KEY), Some(&body)).await {
                    Err(_) => {
                        out.unknown.push((p, user));
                        break;
                    }
                    Ok(r) => match (r.status, r.body["code"].as_str()) {
                        (200, _) => {
                            work.answered.fetch_add(1, Ordering::Relaxed);
                            let amount = r.body["amount"].as_i64();
                            match amount {
                                Some(a) if r.body["user"] == user.as_str() => out.paid.push((p, user, a)),
                                _ => out.unexpected.push(format!("POST {path} {body}: 200 {}", r.body)),
                            }
                        }
                        (410, Some("packet_exhausted")) => {
                            work.answered.fetch_add(1, Ordering::Relaxed);
                            out.exhausted.push((p, user));
                        }
                        // A hold lost to a restart, or the grab itself turned away: try again.
                        (409, Some("not_grabbed")) | (429 | 503, _) => {
                            out.shed += 1;
                            work.push_front([(p, user)]);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        (status, _) => {
                            out.unexpected.push(format!("POST {path} {body}: {status} {}", r.body))
                        }
                    },
                }
            }
            out
        }));
    }
    let mut all = Outcome::default();
    for t in tasks {
        all.merge(t.await.expect("claim task panicked"));
    }
    all
}
