//! Webhook signatures, Standard Webhooks v1.
//!
//! Every attempt carries `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{ts}.{body}")>`,
//! one entry per configured secret, space-separated, so a receiver can rotate secrets without a
//! window where valid deliveries are rejected. Secrets come as `whsec_<base64 key>`; the key is
//! never printed (`SigningKey`'s `Debug` redacts it, `SecretError` never echoes it).

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const SECRET_PREFIX: &str = "whsec_";
const VERSION: &str = "v1";

/// Secrets are pasted by hand: accept them with or without `=` padding rather than fail on a
/// detail that carries no information.
const SECRET_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A signing key from a `whsec_<base64>` secret.
#[derive(Clone)]
pub struct SigningKey {
    /// HMAC already keyed with the decoded secret: keying is the only fallible step, so it
    /// happens once in `parse` and signing cannot fail afterwards.
    mac: HmacSha256,
}

/// Why a webhook secret was rejected. Messages say what to fix and never contain the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error(
        "webhook secret must look like `whsec_<base64 key>`: copy it whole from the receiver, \
         or generate one with `echo whsec_$(openssl rand -base64 32)`"
    )]
    MissingPrefix,
    #[error(
        "webhook secret is not valid base64 after `whsec_` \
         (check it was copied whole, without spaces or line breaks)"
    )]
    InvalidBase64,
    #[error(
        "webhook secret has no key after `whsec_` \
         (generate one with `echo whsec_$(openssl rand -base64 32)`)"
    )]
    Empty,
    /// HMAC accepts keys of any length, so hmac 0.12 never produces this; it exists so that a
    /// future hmac cannot turn `parse` into a panic.
    #[error(
        "webhook secret was rejected as an HMAC-SHA256 key \
         (generate a new one with `echo whsec_$(openssl rand -base64 32)`)"
    )]
    KeyRejected,
}

impl SigningKey {
    /// Parses a `whsec_<base64>` secret. The secret is taken as given: no trimming.
    pub fn parse(secret: &str) -> Result<SigningKey, SecretError> {
        let encoded = secret
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = SECRET_BASE64
            .decode(encoded)
            .map_err(|_| SecretError::InvalidBase64)?;
        // An empty HMAC key would sign with no secret at all.
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        let mac = HmacSha256::new_from_slice(&key).map_err(|_| SecretError::KeyRejected)?;
        Ok(SigningKey { mac })
    }

    fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, one per key, space-separated.
pub fn signature_header(keys: &[SigningKey], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| {
            let tag = key.mac(msg_id, timestamp, body).finalize().into_bytes();
            format!("{VERSION},{}", STANDARD.encode(tag))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// True when any `v1,...` entry of `header` matches any key. Entries of other versions or with
/// malformed base64 are ignored, as the standard asks. The comparison is constant-time
/// (`verify_slice`). Timestamp freshness is the receiver's policy and is not checked here.
pub fn verify(
    keys: &[SigningKey],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
) -> bool {
    let tags: Vec<Vec<u8>> = header
        .split_ascii_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == VERSION)
        .filter_map(|(_, encoded)| STANDARD.decode(encoded).ok())
        .collect();
    keys.iter().any(|key| {
        tags.iter()
            .any(|tag| key.mac(msg_id, timestamp, body).verify_slice(tag).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Published test vector of the standard-webhooks reference libraries.
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const MSG_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TIMESTAMP: i64 = 1649367553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SIGNATURE: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
    // Any other valid secret, for rotation tests.
    const OTHER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn key(secret: &str) -> SigningKey {
        SigningKey::parse(secret).unwrap()
    }

    #[test]
    fn matches_published_vector() {
        assert_eq!(
            signature_header(&[key(SECRET)], MSG_ID, TIMESTAMP, BODY),
            SIGNATURE
        );
        assert!(verify(&[key(SECRET)], MSG_ID, TIMESTAMP, BODY, SIGNATURE));
    }

    #[test]
    fn padding_is_optional() {
        // 8 key bytes encode to "AAECAwQFBgc=" with padding.
        let padded = signature_header(&[key("whsec_AAECAwQFBgc=")], MSG_ID, TIMESTAMP, BODY);
        let unpadded = signature_header(&[key("whsec_AAECAwQFBgc")], MSG_ID, TIMESTAMP, BODY);
        assert_eq!(padded, unpadded);
    }

    #[test]
    fn rotation_signs_with_every_key_and_verify_accepts_either() {
        let keys = [key(SECRET), key(OTHER_SECRET)];
        let header = signature_header(&keys, MSG_ID, TIMESTAMP, BODY);
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], SIGNATURE);
        assert!(entries[1].starts_with("v1,") && entries[1] != SIGNATURE);

        // A receiver that knows only one of the secrets still accepts the delivery.
        assert!(verify(&[key(SECRET)], MSG_ID, TIMESTAMP, BODY, &header));
        assert!(verify(
            &[key(OTHER_SECRET)],
            MSG_ID,
            TIMESTAMP,
            BODY,
            &header
        ));
        // And a receiver that knows both accepts a header signed with only one.
        assert!(verify(&keys, MSG_ID, TIMESTAMP, BODY, SIGNATURE));
    }

    #[test]
    fn no_keys_give_an_empty_header_that_verifies_nothing() {
        assert_eq!(signature_header(&[], MSG_ID, TIMESTAMP, BODY), "");
        assert!(!verify(&[], MSG_ID, TIMESTAMP, BODY, SIGNATURE));
    }

    #[test]
    fn rejects_tampering() {
        let keys = [key(SECRET)];
        let tampered_body = br#"{"email":"evil@example.com","username":"test_user"}"#;
        assert!(!verify(&keys, MSG_ID, TIMESTAMP, tampered_body, SIGNATURE));
        assert!(!verify(&keys, MSG_ID, TIMESTAMP + 1, BODY, SIGNATURE));
        assert!(!verify(&keys, "msg_other", TIMESTAMP, BODY, SIGNATURE));
        assert!(!verify(
            &[key(OTHER_SECRET)],
            MSG_ID,
            TIMESTAMP,
            BODY,
            SIGNATURE
        ));
    }

    #[test]
    fn ignores_other_versions_and_malformed_entries() {
        let keys = [key(SECRET)];
        let tag = SIGNATURE.trim_start_matches("v1,");
        assert!(!verify(
            &keys,
            MSG_ID,
            TIMESTAMP,
            BODY,
            &format!("v2,{tag}")
        ));
        assert!(!verify(&keys, MSG_ID, TIMESTAMP, BODY, tag));
        assert!(!verify(&keys, MSG_ID, TIMESTAMP, BODY, "v1,not*base64"));
        // A truncated tag must not verify (verify_slice demands the full length).
        assert!(!verify(
            &keys,
            MSG_ID,
            TIMESTAMP,
            BODY,
            "v1,tZ1I4/hDygAJgO5T"
        ));
        // Garbage around a good entry does not hide it.
        let header = format!("v2,abc v1,!!! {SIGNATURE}  ");
        assert!(verify(&keys, MSG_ID, TIMESTAMP, BODY, &header));
    }

    #[test]
    fn rejects_bad_secrets() {
        assert_eq!(
            SigningKey::parse("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap_err(),
            SecretError::MissingPrefix
        );
        assert_eq!(
            SigningKey::parse("WHSEC_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap_err(),
            SecretError::MissingPrefix
        );
        assert_eq!(
            SigningKey::parse("whsec_not base64!").unwrap_err(),
            SecretError::InvalidBase64
        );
        assert_eq!(
            SigningKey::parse(" whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap_err(),
            SecretError::MissingPrefix
        );
        assert_eq!(
            SigningKey::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\n").unwrap_err(),
            SecretError::InvalidBase64
        );
        assert_eq!(SigningKey::parse("whsec_").unwrap_err(), SecretError::Empty);
        assert_eq!(
            SigningKey::parse("whsec_==").unwrap_err(),
            SecretError::InvalidBase64
        );
    }

    #[test]
    fn errors_do_not_echo_the_secret() {
        let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7o!";
        let err = SigningKey::parse(secret).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("C2FVsBQ"), "{shown}");
    }

    #[test]
    fn debug_redacts_the_key() {
        let keys = vec![key(SECRET)];
        assert_eq!(format!("{:?}", keys[0]), "SigningKey(<redacted>)");
        assert_eq!(format!("{keys:#?}"), "[\n    SigningKey(<redacted>),\n]");
    }
}
