//! One error type for upstream calls. Its class, taken from the vendor's
//! error-code tables, is what later decides retry, slow down, noop, open the
//! circuit, or dead-letter.

use super::api::Api;

/// What to do about a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Retry with exponential backoff and jitter.
    Transient,
    /// Call frequency exceeded: slow the API down, then retry.
    RateLimited,
    /// Nothing left to do (the channel is gone when removing from it).
    Moot,
    /// Credentials or service unusable: stop dispatching and alert.
    Credentials,
    /// The request itself is wrong: isolate and dead-letter.
    BadRequest,
    /// A quota on the target (channel full, user at their channel limit):
    /// retrying cannot help; dead-letter with the reason.
    Limit,
    /// A code the tables do not list: retry a bounded number of times.
    Unknown,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Moot => "moot",
            ErrorClass::Credentials => "credentials",
            ErrorClass::BadRequest => "bad_request",
            ErrorClass::Limit => "limit",
            ErrorClass::Unknown => "unknown",
        }
    }

    /// Whether the same request may succeed if sent again later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::Transient | ErrorClass::RateLimited | ErrorClass::Unknown
        )
    }
}

/// Classifies a non-zero vendor `ErrorCode` returned by `api`.
pub fn classify(api: Api, code: i64) -> ErrorClass {
    match code {
        10002 | 10004 | 20004 | 20005 | 30006 | 30007 | 30008 | 70169 | 70500 => {
            ErrorClass::Transient
        }
        60007 | 60011 | 60018 | 60019 => ErrorClass::RateLimited,
        130004 => match api {
            Api::DeleteSubscriber | Api::DestroyOfficialAccount => ErrorClass::Moot,
            _ => ErrorClass::BadRequest,
        },
        70001 | 70002 | 70003 | 70005 | 70009 | 70013 | 70014 | 70016 | 70020 | 70050 | 70052
        | 60004 | 60005 | 60006 | 60010 | 60016 | 60020 | 60021 | 131000 | 30002 | 30004
        | 30005 => ErrorClass::Credentials,
        6017 | 20001 | 60002 | 60003 | 130002 | 130007 | 130008 | 30001 | 30003 => {
            ErrorClass::BadRequest
        }
        130006 | 130010 => ErrorClass::Limit,
        _ => ErrorClass::Unknown,
    }
}

/// A failed upstream call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The vendor answered with a non-zero `ErrorCode`.
    #[error("{api} answered ErrorCode {code}: {info}")]
    Vendor { api: Api, code: i64, info: String },
    /// A non-200 HTTP status (the vendor only does this for network faults).
    #[error("{api} answered HTTP {status}")]
    Http { api: Api, status: u16 },
    #[error("{api} timed out")]
    Timeout { api: Api },
    #[error("{api}: could not connect: {detail}")]
    Connect { api: Api, detail: String },
    /// A 200 whose body is not the documented JSON.
    #[error("{api}: undecodable answer: {detail}")]
    Decode { api: Api, detail: String },
    /// Not sent: at the last moment this replica was not (or could no
    /// longer trust that it was) the active dispatcher. Never counted as a
    /// request; the work goes back through admission.
    #[error("{api}: not sent: this replica is not the active dispatcher")]
    NotSent { api: Api },
}

impl ApiError {
    pub fn api(&self) -> Api {
        match self {
            ApiError::Vendor { api, .. }
            | ApiError::Http { api, .. }
            | ApiError::Timeout { api }
            | ApiError::Connect { api, .. }
            | ApiError::Decode { api, .. }
            | ApiError::NotSent { api } => *api,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            ApiError::Vendor { api, code, .. } => classify(*api, *code),
            ApiError::Http { status, .. } if *status >= 500 || *status == 429 => {
                ErrorClass::Transient
            }
            // A 4xx from the vendor's front end means our request is wrong.
            ApiError::Http { .. } => ErrorClass::BadRequest,
            ApiError::Timeout { .. } | ApiError::Connect { .. } => ErrorClass::Transient,
            // A garbled body is most likely a proxy or truncation fault.
            ApiError::Decode { .. } => ErrorClass::Transient,
            ApiError::NotSent { .. } => ErrorClass::Transient,
        }
    }

    /// The `error_code` label value of `chat_janitor_upstream_requests_total`.
    pub fn metric_code(&self) -> String {
        match self {
            ApiError::Vendor { code, .. } => code.to_string(),
            ApiError::Http { status, .. } => format!("http_{status}"),
            ApiError::Timeout { .. } => "timeout".into(),
            ApiError::Connect { .. } => "connect".into(),
            ApiError::Decode { .. } => "decode".into(),
            ApiError::NotSent { .. } => "not_sent".into(),
        }
    }

    /// The vendor code, when there is one.
    pub fn vendor_code(&self) -> Option<i64> {
        match self {
            ApiError::Vendor { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_notes() {
        use ErrorClass::*;
        let d = Api::DeleteSubscriber;
        for c in [
            10002, 10004, 20004, 20005, 30006, 30007, 30008, 70169, 70500,
        ] {
            assert_eq!(classify(d, c), Transient, "{c}");
        }
        for c in [60007, 60011, 60018, 60019] {
            assert_eq!(classify(d, c), RateLimited, "{c}");
        }
        for c in [
            70001, 70002, 70003, 70005, 70009, 70013, 70014, 70016, 70020, 70052, 70050, 60004,
            60005, 60006, 60010, 60016, 60020, 60021, 131000, 30004, 30005,
        ] {
            assert_eq!(classify(d, c), Credentials, "{c}");
        }
        for c in [6017, 20001, 60002, 60003, 130007, 30001, 30003] {
            assert_eq!(classify(d, c), BadRequest, "{c}");
        }
        assert_eq!(classify(Api::DeleteSubscriber, 130004), Moot);
        assert_eq!(classify(Api::DestroyOfficialAccount, 130004), Moot);
        assert_eq!(classify(Api::AddSubscriber, 130004), BadRequest);
        assert_eq!(classify(Api::AddSubscriber, 130006), Limit);
        assert_eq!(classify(Api::AddSubscriber, 130010), Limit);
        assert_eq!(classify(d, 424242), Unknown);
    }

    #[test]
    fn transport_errors() {
        let api = Api::FollowDelete;
        assert_eq!(
            ApiError::Http { api, status: 502 }.class(),
            ErrorClass::Transient
        );
        assert_eq!(
            ApiError::Http { api, status: 502 }.metric_code(),
            "http_502"
        );
        assert_eq!(ApiError::Timeout { api }.class(), ErrorClass::Transient);
        assert_eq!(ApiError::Timeout { api }.metric_code(), "timeout");
        assert_eq!(
            ApiError::Http { api, status: 404 }.class(),
            ErrorClass::BadRequest
        );
    }
}
