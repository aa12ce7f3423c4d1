//! A Standard Webhooks signing key: `whsec_` followed by base64 of 24 to 64
//! random bytes. Decoded once, where the secret is read (configuration or
//! the command line); never printed. Also the scheme's signature itself,
//! which the webhook edge verifies and the completion callbacks sign with.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA256.
pub type HmacSha256 = Hmac<Sha256>;

/// The MAC of a Standard Webhooks message: over `{id}.{timestamp}.{body}`.
pub fn mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The `webhook-signature` value for one key: `v1,<base64>`.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    format!(
        "v1,{}",
        STANDARD.encode(mac(key, id, timestamp, body).finalize().into_bytes())
    )
}

/// The decoded HMAC key of a `whsec_...` secret.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookKey(Vec<u8>);

impl WebhookKey {
    /// Decodes `whsec_` + base64; the problem, if any, for the error line.
    pub fn decode(secret: &str) -> Result<WebhookKey, &'static str> {
        let b64 = secret
            .strip_prefix("whsec_")
            .ok_or("must start with \"whsec_\"")?;
        let key = STANDARD
            .decode(b64)
            .map_err(|_| "is not valid base64 after \"whsec_\"")?;
        if !(24..=64).contains(&key.len()) {
            return Err("must decode to 24..64 bytes");
        }
        Ok(WebhookKey(key))
    }

    /// A key given as raw bytes rather than as a `whsec_` secret.
    pub fn from_bytes(key: Vec<u8>) -> WebhookKey {
        WebhookKey(key)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert!(WebhookKey::decode("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").is_ok());
        assert!(WebhookKey::decode("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").is_err());
        assert!(WebhookKey::decode("whsec_YWJj").is_err());
        let k = WebhookKey::decode("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert!(!format!("{k:?}").contains("C2FV"));
    }
}
