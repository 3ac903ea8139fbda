//! What the load calls: the same operations over HTTP or straight into the engine.
//!
//! An enum rather than a trait object: one match per request, no boxing of futures.

use std::sync::Arc;

use hongbao_core::{Audience, Kind, PacketId, RequestId, SendRequest, UserId};
use hongbao_engine::{Engine, EngineError};

use crate::http::{Endpoint, HttpClient};
use crate::record::Outcome;

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A claim paid this many fen.
    Paid(i64),
    /// Anything else that succeeded: a send, a deposit, a query, a health check.
    Done,
    /// The packet is exhausted or expired.
    Away,
    /// Refused because the service is saturated.
    Overloaded,
    Error(String),
}

impl Answer {
    pub fn outcome(&self) -> Outcome {
        match self {
            Answer::Paid(_) | Answer::Done => Outcome::Ok,
            Answer::Away => Outcome::Away,
            Answer::Overloaded => Outcome::Overloaded,
            Answer::Error(_) => Outcome::Error,
        }
    }

    pub fn paid_fen(&self) -> i64 {
        match self {
            Answer::Paid(fen) => *fen,
            _ => 0,
        }
    }
}

/// Where the load goes.
#[derive(Clone)]
pub enum Target {
    Http(Arc<Endpoint>),
    Engine(Engine),
}

impl Target {
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(match self {
            Target::Http(endpoint) => Client::Http(Box::new(HttpClient::connect(endpoint.clone()).await?)),
            Target::Engine(engine) => Client::Engine(engine.clone()),
        })
    }
}

/// One task's connection (or engine handle).
pub enum Client {
    Http(Box<HttpClient>),
    Engine(Engine),
}

fn engine_answer<T>(r: Result<T, EngineError>, paid: impl FnOnce(&T) -> Option<i64>) -> Answer {
    match r {
        Ok(v) => match paid(&v) {
            Some(fen) => Answer::Paid(fen),
            None => Answer::Done,
        },
        Err(EngineError::Claim(hongbao_core::ClaimError::Exhausted | hongbao_core::ClaimError::Expired)) => {
            Answer::Away
        }
        Err(EngineError::Overloaded) => Answer::Overloaded,
        Err(e) => Answer::Error(e.to_string()),
    }
}

impl Client {
    /// The server's own time for the last answer, where it said (`Server-Timing`, over HTTP).
    pub fn server_time(&self) -> Option<std::time::Duration> {
        match self {
            Client::Http(c) => c.server_time(),
            Client::Engine(_) => None,
        }
    }

    pub async fn claim(&mut self, packet: u64, user: &str) -> Answer {
        match self {
            Client::Http(c) => c.claim(packet, user).await,
            Client::Engine(engine) => {
                let (Ok(id), Ok(user)) = (PacketId::from_raw(packet), UserId::parse(user)) else {
                    return Answer::Error(format!("bad packet {packet} or user {user}"));
                };
                engine_answer(engine.claim(id, user).await, |r| Some(r.amount_fen))
            }
        }
    }

    /// Claims many shares in one engine call (`Engine::claim_many`); in process only.
    pub async fn claim_many(&mut self, claims: Vec<(PacketId, UserId)>) -> Vec<Answer> {
        match self {
            Client::Http(_) => {
                claims.iter().map(|_| Answer::Error("a batch needs --in-process".into())).collect()
            }
            Client::Engine(engine) => engine
                .claim_many(claims)
                .await
                .into_iter()
                .map(|r| engine_answer(r, |r| Some(r.amount_fen)))
                .collect(),
        }
    }

    pub async fn healthz(&mut self) -> Answer {
        match self {
            Client::Http(c) => c.healthz().await,
            Client::Engine(_) => Answer::Error("healthz needs HTTP".to_string()),
        }
    }

    pub async fn history(&mut self, user: &str, sent: bool) -> Answer {
        match self {
            Client::Http(c) => c.history(user, sent).await,
            Client::Engine(engine) => {
                let Ok(user) = UserId::parse(user) else {
                    return Answer::Error(format!("bad user {user}"));
                };
                if sent {
                    engine_answer(engine.sent(user, None, None, 20).await, |_| None)
                } else {
                    engine_answer(engine.received(user, None, None, 20).await, |_| None)
                }
            }
        }
    }

    pub async fn deposit(&mut self, user: &str, amount_fen: i64, request_id: &str) -> Answer {
        match self {
            Client::Http(c) => c.deposit(user, amount_fen, request_id).await,
            Client::Engine(engine) => {
                let parsed = (
                    UserId::parse(user),
                    hongbao_core::Amount::new(amount_fen),
                    RequestId::parse(request_id),
                );
                let (Ok(user), Ok(amount), Ok(request_id)) = parsed else {
                    return Answer::Error(format!("bad deposit {user} {amount_fen} {request_id}"));
                };
                engine_answer(engine.deposit(user, amount, request_id).await, |_| None)
            }
        }
    }

    /// Sends a lucky packet for anyone; the new packet's id comes back with the answer.
    pub async fn send(
        &mut self,
        sender: &str,
        total_fen: i64,
        count: u32,
        expires_in_s: i64,
        request_id: &str,
    ) -> (Answer, Option<u64>) {
        match self {
            Client::Http(c) => c.send(sender, total_fen, count, expires_in_s, request_id).await,
            Client::Engine(engine) => {
                let (Ok(sender), Ok(request_id)) = (UserId::parse(sender), RequestId::parse(request_id))
                else {
                    return (Answer::Error(format!("bad sender {sender} or request {request_id}")), None);
                };
                let req = SendRequest {
                    sender,
                    kind: Kind::Lucky,
                    total_fen,
                    count: i64::from(count),
                    audience: Audience::Anyone,
                    greeting: None,
                    expires_in_s: Some(expires_in_s),
                    request_id,
                };
                let send = match engine.limits().validate_send(req) {
                    Ok(send) => send,
                    Err(e) => return (Answer::Error(format!("send refused: {e}")), None),
                };
                match engine.send(send).await {
                    Ok(summary) => (Answer::Done, Some(summary.id.raw())),
                    Err(e) => (engine_answer::<()>(Err(e), |_| None), None),
                }
            }
        }
    }
}
