//! The one integration-test binary: each module drives real parts (the
//! emulator and the app on loopback port 0, a temp journal) through their
//! public surface.

mod amqp;
mod binary;
mod broker_records;
mod broker_sweep;
mod client;
mod dead_log;
mod emulator;
mod fate;
mod helpers;
mod journal;
mod lease;
mod pipeline;
mod records;
mod replicas;
mod restore;
mod sweep;
mod usersig;
mod webhook;
