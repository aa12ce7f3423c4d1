//! The upstream endpoints we call, their paths and the limits the vendor sets.

pub use crate::domain::Api;

impl Api {
    /// The service segment of the URL.
    pub fn service(self) -> &'static str {
        match self {
            Api::FollowDelete | Api::FollowAdd | Api::FollowGet | Api::FollowCheck => "follow",
            _ => "official_account_open_http_svc",
        }
    }

    /// `v4/{service}/{command}`.
    pub fn path(self) -> String {
        format!("v4/{}/{}", self.service(), self.name())
    }

    /// Parses `service/command` as it appears in a request path.
    pub fn from_path(service: &str, command: &str) -> Option<Api> {
        Api::ALL
            .into_iter()
            .find(|a| a.service() == service && a.name() == command)
    }
}

/// Most accounts one `add_subscriber` / `delete_subscriber` call may carry.
pub const MAX_SUBSCRIBERS_PER_CALL: usize = 100;
/// Most `To_Account`s one `follow_delete` / `follow_add` call may carry.
pub const MAX_FOLLOWS_PER_CALL: usize = 20;
/// Most items one `get_subscriber_info` page may ask for.
pub const MAX_SUBSCRIBER_PAGE: u32 = 200;
/// Most accounts one `follow_check` may carry.
pub const MAX_FOLLOW_CHECK: usize = 100;
/// Most items one `follow_get` page may ask for.
pub const MAX_FOLLOW_GET: u32 = 1000;
/// The vendor's per-API call frequency limit.
pub const VENDOR_CALLS_PER_SECOND: u32 = 200;

/// Regional API domains.
pub fn region_domain(region: &str) -> Option<&'static str> {
    Some(match region {
        "china" => "console.tim.qq.com",
        "singapore" => "adminapisgp.im.qcloud.com",
        "seoul" => "adminapikr.im.qcloud.com",
        "tokyo" => "adminapijpn.im.qcloud.com",
        "frankfurt" => "adminapiger.im.qcloud.com",
        "mumbai" => "adminapiind.im.qcloud.com",
        "silicon-valley" => "adminapiusa.im.qcloud.com",
        "jakarta" => "adminapiidn.im.qcloud.com",
        _ => return None,
    })
}

pub const REGIONS: [&str; 8] = [
    "china",
    "singapore",
    "seoul",
    "tokyo",
    "frankfurt",
    "mumbai",
    "silicon-valley",
    "jakarta",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for api in Api::ALL {
            let path = api.path();
            let mut parts = path.split('/').skip(1);
            let (s, c) = (parts.next().unwrap(), parts.next().unwrap());
            assert_eq!(Api::from_path(s, c), Some(api));
        }
        assert_eq!(
            Api::DeleteSubscriber.path(),
            "v4/official_account_open_http_svc/delete_subscriber"
        );
        assert_eq!(Api::FollowDelete.path(), "v4/follow/follow_delete");
    }

    #[test]
    fn every_region_has_a_domain() {
        for r in REGIONS {
            assert!(region_domain(r).is_some(), "{r}");
        }
        assert_eq!(region_domain("mars"), None);
    }
}
