//! A Standard Webhooks signing key: `whsec_` followed by base64 of 24 to 64
//! random bytes. Decoded once, where the secret is read (configuration or
//! the command line); never printed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

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
