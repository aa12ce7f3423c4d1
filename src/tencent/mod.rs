//! Tencent Cloud Chat REST: endpoints, identifiers, wire types, UserSig, error
//! classes, and the client that ties them together.

pub mod api;
pub mod batch;
pub mod client;
pub mod error;
pub mod types;
pub mod usersig;

pub use api::Api;
pub use batch::{Batch, FollowBatch, SubscriberBatch};
pub use client::{ClientOptions, TencentClient};
pub use error::{ApiError, ErrorClass};
