//! Where events enter: signed webhooks over HTTP.

pub mod amqp;
pub mod http;
pub mod signature;
