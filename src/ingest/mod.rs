//! The HTTP surface: signed webhooks (`http`, verified by `signature`), the
//! probes and metrics, and the admin routes (`admin`). Broker deliveries
//! enter through `crate::inbox::consumer`.

pub mod admin;
pub mod http;
pub mod signature;
