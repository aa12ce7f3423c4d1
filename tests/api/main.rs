//! The one integration-test binary: each module drives real parts (the
//! emulator and the app on loopback port 0, a temp journal) through their
//! public surface.

mod amqp;
mod binary;
mod client;
mod emulator;
mod helpers;
mod journal;
mod pipeline;
mod restore;
mod usersig;
mod webhook;
