//! Tencent Cloud Chat REST: endpoints, identifiers, wire types, UserSig, error
//! classes, and the client that ties them together.

pub mod api;
pub mod client;
pub mod error;
pub mod ids;
pub mod types;
pub mod usersig;

pub use api::Api;
pub use client::{ClientOptions, TencentClient};
pub use error::{ApiError, ErrorClass};
pub use ids::{Batch, ChannelId, FollowBatch, SubscriberBatch, UserId};
