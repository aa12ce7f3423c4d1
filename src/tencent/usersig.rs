//! UserSig version 2: the admin credential Tencent Cloud Chat expects in every
//! REST call. Generation and verification follow the vendor's signing
//! libraries step by step (see `shared/tencent-api/NOTES.md`); verification
//! never compares strings, because implementations differ in JSON spacing and
//! key order.

use std::io::{Read, Write};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Largest decoded UserSig we are willing to inflate; real ones are ~200 bytes.
const MAX_INFLATED: u64 = 16 * 1024;

/// The fields a verified UserSig carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSigClaims {
    pub identifier: String,
    pub sdkappid: u64,
    /// Unix seconds when it was issued.
    pub time: u64,
    /// Lifetime in seconds, relative to `time`.
    pub expire: u64,
}

impl UserSigClaims {
    /// Unix second after which the signature is expired.
    pub fn expires_at(&self) -> u64 {
        self.time.saturating_add(self.expire)
    }
}

/// Why a UserSig was refused, with the vendor's error code for each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserSigError {
    #[error("UserSig expired")]
    Expired,
    #[error("UserSig HMAC does not match")]
    BadHmac,
    #[error("UserSig was issued for another identifier")]
    IdentifierMismatch,
    #[error("UserSig was issued for another SDKAppID")]
    SdkAppIdMismatch,
    #[error("UserSig is malformed: {0}")]
    Malformed(&'static str),
}

impl UserSigError {
    /// The ErrorCode Tencent answers for this failure.
    pub fn error_code(&self) -> i64 {
        match self {
            UserSigError::Expired => 70001,
            UserSigError::BadHmac => 70009,
            UserSigError::IdentifierMismatch => 70013,
            UserSigError::SdkAppIdMismatch => 70014,
            UserSigError::Malformed(_) => 70003,
        }
    }
}

/// The content that is signed (step 1).
fn sign_content(identifier: &str, sdkappid: u64, time: u64, expire: u64) -> String {
    format!(
        "TLS.identifier:{identifier}\nTLS.sdkappid:{sdkappid}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    )
}

/// `TLS.sig` (step 2): base64 of HMAC-SHA256 keyed by the key's UTF-8 bytes.
pub fn hmac_sig(
    secret_key: &str,
    identifier: &str,
    sdkappid: u64,
    time: u64,
    expire: u64,
) -> String {
    STANDARD.encode(hmac_raw(secret_key, identifier, sdkappid, time, expire))
}

fn hmac_raw(secret_key: &str, identifier: &str, sdkappid: u64, time: u64, expire: u64) -> Vec<u8> {
    let mut mac =
        HmacSha256::new_from_slice(secret_key.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(sign_content(identifier, sdkappid, time, expire).as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Makes a UserSig issued at `time` (unix seconds) valid for `expire` seconds.
pub fn generate(
    secret_key: &str,
    sdkappid: u64,
    identifier: &str,
    time: u64,
    expire: u64,
) -> String {
    let doc = serde_json::json!({
        "TLS.ver": "2.0",
        "TLS.identifier": identifier,
        "TLS.sdkappid": sdkappid,
        "TLS.expire": expire,
        "TLS.time": time,
        "TLS.sig": hmac_sig(secret_key, identifier, sdkappid, time, expire),
    });
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    z.write_all(doc.to_string().as_bytes())
        .expect("writing to a Vec cannot fail");
    let compressed = z.finish().expect("writing to a Vec cannot fail");
    to_url_safe(&STANDARD.encode(compressed))
}

/// Step 4's character substitution, and its reverse.
fn to_url_safe(b64: &str) -> String {
    b64.chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            c => c,
        })
        .collect()
}

fn from_url_safe(sig: &str) -> String {
    sig.chars()
        .map(|c| match c {
            '*' => '+',
            '-' => '/',
            '_' => '=',
            c => c,
        })
        .collect()
}

/// Reads a number that signing libraries emit either as a JSON number or as a
/// decimal string.
fn number_field(doc: &Value, key: &str) -> Option<u64> {
    match doc.get(key)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Decodes a UserSig without checking it against anything.
pub fn decode(sig: &str) -> Result<(UserSigClaims, Vec<u8>), UserSigError> {
    if sig.is_empty() {
        return Err(UserSigError::Malformed("empty"));
    }
    let compressed = STANDARD
        .decode(from_url_safe(sig))
        .map_err(|_| UserSigError::Malformed("not base64"))?;
    let mut json = Vec::new();
    ZlibDecoder::new(compressed.as_slice())
        .take(MAX_INFLATED)
        .read_to_end(&mut json)
        .map_err(|_| UserSigError::Malformed("not zlib"))?;
    let doc: Value =
        serde_json::from_slice(&json).map_err(|_| UserSigError::Malformed("not JSON"))?;
    let identifier = doc
        .get("TLS.identifier")
        .and_then(Value::as_str)
        .ok_or(UserSigError::Malformed("no TLS.identifier"))?
        .to_owned();
    let sdkappid =
        number_field(&doc, "TLS.sdkappid").ok_or(UserSigError::Malformed("no TLS.sdkappid"))?;
    let time = number_field(&doc, "TLS.time").ok_or(UserSigError::Malformed("no TLS.time"))?;
    let expire =
        number_field(&doc, "TLS.expire").ok_or(UserSigError::Malformed("no TLS.expire"))?;
    let mac = doc
        .get("TLS.sig")
        .and_then(Value::as_str)
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or(UserSigError::Malformed("no TLS.sig"))?;
    Ok((
        UserSigClaims {
            identifier,
            sdkappid,
            time,
            expire,
        },
        mac,
    ))
}

/// Verifies a UserSig as the vendor does: sdkappid, identifier, expiry, then
/// the HMAC (in constant time).
pub fn verify(
    sig: &str,
    secret_key: &str,
    sdkappid: u64,
    identifier: &str,
    now: u64,
) -> Result<UserSigClaims, UserSigError> {
    let (claims, mac) = decode(sig)?;
    if claims.sdkappid != sdkappid {
        return Err(UserSigError::SdkAppIdMismatch);
    }
    if claims.identifier != identifier {
        return Err(UserSigError::IdentifierMismatch);
    }
    if now > claims.expires_at() {
        return Err(UserSigError::Expired);
    }
    let mut check =
        HmacSha256::new_from_slice(secret_key.as_bytes()).expect("HMAC accepts keys of any length");
    check.update(
        sign_content(
            &claims.identifier,
            claims.sdkappid,
            claims.time,
            claims.expire,
        )
        .as_bytes(),
    );
    check
        .verify_slice(&mac)
        .map_err(|_| UserSigError::BadHmac)?;
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";

    #[test]
    fn known_answer_xiaojun() {
        assert_eq!(
            hmac_sig(KEY, "xiaojun", 1_400_000_000, 1_700_000_000, 15_552_000),
            "LvA7d/Iw7gSsnskvVzBDPOCCDbuNCw4GHwTC0bip+B4="
        );
    }

    #[test]
    fn known_answer_administrator() {
        assert_eq!(
            hmac_sig(KEY, "administrator", 1_400_000_000, 1_600_000_000, 86_400),
            "los0WU+OsAqKAMeEseEb6GMMPAPQp6knnzQ5XIlQj0U="
        );
    }

    #[test]
    fn round_trip() {
        let sig = generate(KEY, 1_400_000_000, "administrator", 1_600_000_000, 86_400);
        assert!(!sig.contains(['+', '/', '=']));
        let claims = verify(&sig, KEY, 1_400_000_000, "administrator", 1_600_000_100).unwrap();
        assert_eq!(claims.expires_at(), 1_600_086_400);
    }

    #[test]
    fn failures_are_distinguished() {
        let sig = generate(KEY, 1_400_000_000, "administrator", 1_600_000_000, 86_400);
        let now = 1_600_000_100;
        assert_eq!(
            verify(&sig, KEY, 1_400_000_001, "administrator", now),
            Err(UserSigError::SdkAppIdMismatch)
        );
        assert_eq!(
            verify(&sig, KEY, 1_400_000_000, "someone", now),
            Err(UserSigError::IdentifierMismatch)
        );
        assert_eq!(
            verify(&sig, KEY, 1_400_000_000, "administrator", 1_600_086_401),
            Err(UserSigError::Expired)
        );
        // Exactly at time + expire it is still valid (`now > time + expire` expires).
        assert!(verify(&sig, KEY, 1_400_000_000, "administrator", 1_600_086_400).is_ok());
        assert_eq!(
            verify(&sig, "other-key", 1_400_000_000, "administrator", now),
            Err(UserSigError::BadHmac)
        );
        assert!(matches!(
            verify("!!!", KEY, 1_400_000_000, "administrator", now),
            Err(UserSigError::Malformed(_))
        ));
        assert!(matches!(
            verify("", KEY, 1_400_000_000, "administrator", now),
            Err(UserSigError::Malformed(_))
        ));
        // Valid base64 of something that is not zlib.
        assert!(matches!(
            verify("aGVsbG8_", KEY, 1_400_000_000, "administrator", now),
            Err(UserSigError::Malformed(_))
        ));
    }

    #[test]
    fn error_codes_match_the_vendor() {
        assert_eq!(UserSigError::Expired.error_code(), 70001);
        assert_eq!(UserSigError::BadHmac.error_code(), 70009);
        assert_eq!(UserSigError::IdentifierMismatch.error_code(), 70013);
        assert_eq!(UserSigError::SdkAppIdMismatch.error_code(), 70014);
    }
}
