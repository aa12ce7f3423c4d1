//! chat-janitor: user-lifecycle events in, coalesced clean-up calls on Tencent
//! Cloud Chat out.
//!
//! ```text
//! POST /v1/events -> verify -> inbox (journal or broker) -> intake -> rules -> coalesce -> dispatch -> Tencent REST
//!                                 ^                                                          |
//!                                 +-------------------------- settle <-- per-item results ---+
//! ```
//! `main.rs` only parses the command line; everything else is here so the
//! tests drive the same code.
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod dispatch;
pub mod domain;
pub mod emulator;
pub mod event;
pub mod fate;
pub mod inbox;
pub mod ingest;
pub mod intake;
pub mod pipeline;
pub mod resolve;
pub mod rules;
pub mod settle;
pub mod storage_faults;
pub mod sweep;
pub mod telemetry;
pub mod tencent;
