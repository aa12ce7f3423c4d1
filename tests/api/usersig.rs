//! Our UserSig against the documented algorithm, implemented here a second
//! time from NOTES.md's steps so the two cannot share a mistake.

use std::io::Read;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use chat_janitor::tencent::usersig;

/// Verifies by the documented steps: undo the character substitution,
/// base64-decode, inflate, parse, recompute the HMAC over the documented
/// content and compare.
fn verify_by_the_documented_steps(sig: &str, key: &str, sdkappid: u64, id: &str) -> bool {
    let b64: String = sig
        .chars()
        .map(|c| match c {
            '*' => '+',
            '-' => '/',
            '_' => '=',
            c => c,
        })
        .collect();
    let Ok(z) = STANDARD.decode(b64) else {
        return false;
    };
    let mut json = String::new();
    if flate2::read::ZlibDecoder::new(&z[..])
        .read_to_string(&mut json)
        .is_err()
    {
        return false;
    }
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["TLS.ver"], "2.0");
    assert_eq!(doc["TLS.identifier"], id);
    assert_eq!(doc["TLS.sdkappid"], sdkappid);
    let time = doc["TLS.time"].as_u64().unwrap();
    let expire = doc["TLS.expire"].as_u64().unwrap();
    let content = format!(
        "TLS.identifier:{id}\nTLS.sdkappid:{sdkappid}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(content.as_bytes());
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    doc["TLS.sig"] == expected.as_str()
}

#[test]
fn ours_verifies_under_the_documented_steps() {
    let key = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
    let sig = usersig::generate(key, 1_400_000_000, "administrator", 1_700_000_000, 86_400);
    assert!(verify_by_the_documented_steps(
        &sig,
        key,
        1_400_000_000,
        "administrator"
    ));
    assert!(!verify_by_the_documented_steps(
        &sig,
        "another-key",
        1_400_000_000,
        "administrator"
    ));
}
