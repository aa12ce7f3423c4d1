//! Where events enter: signed webhooks over HTTP.

pub mod http;
pub mod signature;
