//! Standard Webhooks signatures: `v1,` + base64(HMAC-SHA256(key,
//! "{id}.{timestamp}.{body}")), verified over the exact bytes received, in
//! constant time, against every configured secret (rotation). The MAC
//! itself lives with the key (`domain::webhook_key`), where the completion
//! callbacks sign with it too.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::Mac;

use crate::domain::webhook_key::mac;
pub use crate::domain::webhook_key::sign;
use crate::domain::{RejectReason, WebhookKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not an integer of unix seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is too old")]
    TooOld,
    #[error("webhook-timestamp is too far in the future")]
    TooNew,
    #[error("no signature matches")]
    NoMatch,
}

impl SignatureError {
    /// The `reason` label of `chat_janitor_events_rejected_total`.
    pub fn reason(self) -> RejectReason {
        match self {
            SignatureError::MissingHeader(_) => RejectReason::SignatureMissing,
            SignatureError::BadTimestamp | SignatureError::TooOld | SignatureError::TooNew => {
                RejectReason::Timestamp
            }
            SignatureError::NoMatch => RejectReason::SignatureMismatch,
        }
    }
}

/// Verifies webhooks against a set of decoded secrets.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<WebhookKey>,
    tolerance_seconds: i64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("tolerance_seconds", &self.tolerance_seconds)
            .finish()
    }
}

impl Verifier {
    pub fn new(keys: Vec<WebhookKey>, tolerance_seconds: u64) -> Self {
        Verifier {
            keys,
            tolerance_seconds: i64::try_from(tolerance_seconds).unwrap_or(i64::MAX),
        }
    }

    /// Checks the timestamp window, then every `v1` entry of the signature
    /// list against every key.
    pub fn verify(
        &self,
        id: &str,
        timestamp: &str,
        signatures: &str,
        body: &[u8],
        now: i64,
    ) -> Result<(), SignatureError> {
        let ts: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| SignatureError::BadTimestamp)?;
        if ts < now.saturating_sub(self.tolerance_seconds) {
            return Err(SignatureError::TooOld);
        }
        if ts > now.saturating_add(self.tolerance_seconds) {
            return Err(SignatureError::TooNew);
        }
        let candidates: Vec<Vec<u8>> = signatures
            .split(' ')
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|b64| STANDARD.decode(b64).ok())
            .collect();
        for key in &self.keys {
            let expected = mac(key.as_bytes(), id, timestamp, body);
            for c in &candidates {
                // verify_slice compares in constant time.
                if expected.clone().verify_slice(c).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(SignatureError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: &str = "1649367553";
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn verifier() -> Verifier {
        Verifier::new(vec![WebhookKey::decode(SECRET).unwrap()], 300)
    }

    #[test]
    fn reference_vector() {
        let key = WebhookKey::decode(SECRET).unwrap();
        assert_eq!(sign(key.as_bytes(), ID, TS, BODY), SIG);
        assert_eq!(verifier().verify(ID, TS, SIG, BODY, 1_649_367_553), Ok(()));
    }

    #[test]
    fn list_with_other_versions_and_rotation() {
        let v = Verifier::new(
            vec![
                WebhookKey::from_bytes(vec![7u8; 32]),
                WebhookKey::decode(SECRET).unwrap(),
            ],
            300,
        );
        let header = format!("v1a,AAAA v1,bm9wZQ== {SIG}");
        assert_eq!(v.verify(ID, TS, &header, BODY, 1_649_367_553), Ok(()));
    }

    #[test]
    fn rejections() {
        let v = verifier();
        let now = 1_649_367_553;
        assert_eq!(
            v.verify(ID, TS, SIG, b"{}", now),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            v.verify("other", TS, SIG, BODY, now),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            v.verify(ID, TS, "", BODY, now),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            v.verify(ID, TS, SIG, BODY, now + 301),
            Err(SignatureError::TooOld)
        );
        assert_eq!(
            v.verify(ID, TS, SIG, BODY, now - 301),
            Err(SignatureError::TooNew)
        );
        assert_eq!(
            v.verify(ID, "x", SIG, BODY, now),
            Err(SignatureError::BadTimestamp)
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_headers_and_bodies_never_panic(
            id in ".{0,64}",
            ts in prop_oneof![".{0,24}", any::<i64>().prop_map(|n| n.to_string())],
            sig in prop_oneof![".{0,256}", "(v1,[A-Za-z0-9+/=]{0,60} ?){0,4}"],
            body in proptest::collection::vec(any::<u8>(), 0..1024),
            now in any::<i64>(),
        ) {
            let v = Verifier::new(vec![WebhookKey::from_bytes(vec![1u8; 24])], 300);
            let _ = v.verify(&id, &ts, &sig, &body, now);
        }

        #[test]
        fn what_we_sign_verifies(id in "[a-z0-9_]{1,32}", body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let key = vec![9u8; 32];
            let ts = "1700000000";
            let v = Verifier::new(vec![WebhookKey::from_bytes(key.clone())], 300);
            prop_assert_eq!(v.verify(&id, ts, &sign(&key, &id, ts, &body), &body, 1_700_000_000), Ok(()));
        }
    }
}
