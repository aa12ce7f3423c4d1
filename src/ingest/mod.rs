//! The HTTP surface: signed webhooks (`http`, verified by `signature`), the
//! probes and metrics, the admin routes (`admin`) and the record routes
//! (`records`). Broker deliveries enter through `crate::inbox::consumer`.

pub mod admin;
pub mod http;
pub mod records;
pub mod signature;
