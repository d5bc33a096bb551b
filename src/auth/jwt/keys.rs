//! The keys JWTs are verified with: the HS256 secret, a PEM public key, or a JWKS file
//! whose keys are chosen by `kid` and read again when a token names one it lacks. Every
//! key is checked at load for its kind and strength, so that a wrong key stops the start
//! instead of failing every token.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{DecodingKey, DecodingKeyKind};
use serde_json::Value;

use super::{ConfigError, Rejection, config_error};
use crate::config::{JwtAlgorithm, JwtSettings};

/// An HS256 secret must be at least as long as the hash (RFC 7518 §3.2).
const MIN_HMAC_SECRET: usize = 32;
/// RFC 7518 §3.3: RSA keys of 2048 bits or more.
const MIN_RSA_BYTES: usize = 256;
/// At most one re-read of the JWKS file per this interval, however many unknown `kid`s
/// arrive: a stream of made-up `kid`s must not turn into a stream of file reads.
const JWKS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Where the verification keys come from.
pub(super) enum Keys {
    /// One key (the HS256 secret or a PEM file); the token's `kid` is not consulted.
    Single(Arc<DecodingKey>),
    Jwks(JwksFile),
}

/// The key material the settings name, loaded and checked.
pub(super) fn load_keys(s: &JwtSettings) -> Result<Keys, ConfigError> {
    if s.algorithm == JwtAlgorithm::HS256 {
        if s.public_key_pem.is_some() || s.jwks_file.is_some() {
            return Err(config_error(
                "algorithm",
                "HS256 takes `hs256_secret` only; public keys need RS256, ES256 or EdDSA",
            ));
        }
        let secret = s
            .hs256_secret
            .as_ref()
            .ok_or_else(|| config_error("hs256_secret", "is required with HS256"))?;
        if secret.expose().len() < MIN_HMAC_SECRET {
            return Err(config_error(
                "hs256_secret",
                format!("must be at least {MIN_HMAC_SECRET} bytes"),
            ));
        }
        return Ok(Keys::Single(Arc::new(DecodingKey::from_secret(
            secret.expose().as_bytes(),
        ))));
    }
    // One issuer never mixes an HMAC secret with public keys (RFC 8725 §3.1).
    if s.hs256_secret.is_some() {
        return Err(config_error(
            "hs256_secret",
            format!(
                "is for HS256 only, and `algorithm` is {}",
                s.algorithm.name()
            ),
        ));
    }
    match (&s.public_key_pem, &s.jwks_file) {
        (Some(_), Some(_)) => Err(config_error(
            "jwks_file",
            "give `public_key_pem` or `jwks_file`, not both",
        )),
        (None, None) => Err(config_error(
            "public_key_pem",
            format!(
                "{} needs `public_key_pem` or `jwks_file`",
                s.algorithm.name()
            ),
        )),
        (Some(path), None) => {
            let key = load_pem(path, s.algorithm)
                .map_err(|reason| config_error("public_key_pem", reason))?;
            Ok(Keys::Single(Arc::new(key)))
        }
        (None, Some(path)) => {
            let bytes = std::fs::read(path)
                .map_err(|e| config_error("jwks_file", format!("{}: {e}", path.display())))?;
            let set = KeySet::parse(&bytes, s.algorithm).map_err(|reason| {
                config_error("jwks_file", format!("{}: {reason}", path.display()))
            })?;
            Ok(Keys::Jwks(JwksFile {
                path: path.clone(),
                algorithm: s.algorithm,
                set: RwLock::new(Arc::new(set)),
                last_reload: Mutex::new(None),
            }))
        }
    }
}

/// A public key from a PEM file, checked to suit the algorithm.
fn load_pem(path: &Path, algorithm: JwtAlgorithm) -> Result<DecodingKey, String> {
    let at = |reason: &str| format!("{}: {reason}", path.display());
    let bytes = std::fs::read(path).map_err(|e| at(&e.to_string()))?;
    // The PEM parser would take a private key for its public half without a word; the
    // server has no use for a private key, so it should not hold one.
    if String::from_utf8_lossy(&bytes).contains("PRIVATE KEY") {
        return Err(at("holds a private key; give hotplex only the public key"));
    }
    let key = match algorithm {
        JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(&bytes),
        JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(&bytes),
        JwtAlgorithm::EdDSA => DecodingKey::from_ed_pem(&bytes),
        JwtAlgorithm::HS256 => return Err(at("HS256 takes no public key")),
    }
    .map_err(|_| {
        at(&format!(
            "not a PEM public key for {} ({})",
            algorithm.name(),
            key_kind(algorithm)
        ))
    })?;
    check_key(&key, algorithm).map_err(|reason| at(&reason))?;
    Ok(key)
}

fn key_kind(algorithm: JwtAlgorithm) -> &'static str {
    match algorithm {
        JwtAlgorithm::RS256 => "RSA, at least 2048 bits",
        JwtAlgorithm::ES256 => "EC on P-256",
        JwtAlgorithm::EdDSA => "Ed25519",
        JwtAlgorithm::HS256 => "a secret",
    }
}

/// A key of the right kind and strength, so that a bad key stops the start rather than
/// failing every token.
fn check_key(key: &DecodingKey, algorithm: JwtAlgorithm) -> Result<(), String> {
    use rsa::pkcs1::DecodeRsaPublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let wrong = || format!("not a {} key", key_kind(algorithm));
    match (algorithm, key.kind()) {
        (JwtAlgorithm::RS256, DecodingKeyKind::SecretOrDer(der)) => {
            let rsa = rsa::RsaPublicKey::from_pkcs1_der(der).map_err(|_| wrong())?;
            rsa_size(rsa.size())
        }
        (JwtAlgorithm::RS256, DecodingKeyKind::RsaModulusExponent { n, e }) => {
            let rsa = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(n),
                rsa::BigUint::from_bytes_be(e),
            )
            .map_err(|_| wrong())?;
            rsa_size(rsa.size())
        }
        // An uncompressed P-256 point: 0x04, then 32 bytes of x and of y.
        (JwtAlgorithm::ES256, DecodingKeyKind::SecretOrDer(point))
            if point.len() == 65 && point[0] == 4 =>
        {
            Ok(())
        }
        (JwtAlgorithm::EdDSA, DecodingKeyKind::SecretOrDer(point)) if point.len() == 32 => Ok(()),
        _ => Err(wrong()),
    }
}

fn rsa_size(bytes: usize) -> Result<(), String> {
    if bytes < MIN_RSA_BYTES {
        return Err(format!(
            "an RSA key of {} bits; at least 2048 are required",
            bytes * 8
        ));
    }
    Ok(())
}

/// A JWKS file, read at start and again when a token names a `kid` it lacks (the issuer
/// rotated its keys), at most every [`JWKS_RELOAD_INTERVAL`]. A file that no longer
/// parses is reported and the keys read before stay in use.
pub(super) struct JwksFile {
    path: PathBuf,
    algorithm: JwtAlgorithm,
    set: RwLock<Arc<KeySet>>,
    /// When an unknown `kid` last caused a re-read.
    last_reload: Mutex<Option<Instant>>,
}

impl JwksFile {
    fn current(&self) -> Arc<KeySet> {
        self.set
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) async fn key(&self, kid: Option<&str>) -> Result<Arc<DecodingKey>, Rejection> {
        if let Some(key) = self.current().find(kid) {
            return Ok(key);
        }
        if kid.is_none() || !self.may_reload() {
            return Err(Rejection::UnknownKey);
        }
        let read = tokio::fs::read(&self.path)
            .await
            .map_err(|e| e.to_string())
            .and_then(|bytes| KeySet::parse(&bytes, self.algorithm));
        match read {
            Ok(set) => {
                tracing::info!(path = %self.path.display(), keys = set.keys.len(), "JWKS file read again");
                *self.set.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
            }
            Err(reason) => tracing::warn!(
                path = %self.path.display(),
                %reason,
                "cannot read the JWKS file again; keeping the keys read before"
            ),
        }
        self.current().find(kid).ok_or(Rejection::UnknownKey)
    }

    fn may_reload(&self) -> bool {
        let mut last = self
            .last_reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < JWKS_RELOAD_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// The usable keys of a JWKS document, with their `kid`s.
struct KeySet {
    keys: Vec<(Option<String>, Arc<DecodingKey>)>,
}

impl KeySet {
    /// Keeps the keys for the pinned algorithm and for signatures; others (encryption
    /// keys, other algorithms, key types this library does not know) are skipped.
    fn parse(bytes: &[u8], algorithm: JwtAlgorithm) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<Value>,
        }
        let document: Document =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document ({e})"))?;
        let mut keys: Vec<(Option<String>, Arc<DecodingKey>)> = Vec::new();
        for value in document.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            if !suits(&jwk, algorithm) {
                continue;
            }
            let kid = jwk.common.key_id.clone();
            let key = DecodingKey::from_jwk(&jwk).map_err(|_| {
                format!("key {}: malformed", kid.as_deref().unwrap_or("without kid"))
            })?;
            check_key(&key, algorithm)
                .map_err(|r| format!("key {}: {r}", kid.as_deref().unwrap_or("without kid")))?;
            if kid.is_some() && keys.iter().any(|(k, _)| *k == kid) {
                return Err(format!(
                    "two keys have the kid {}",
                    kid.as_deref().unwrap_or_default()
                ));
            }
            keys.push((kid, Arc::new(key)));
        }
        if keys.is_empty() {
            return Err(format!(
                "holds no {} signature key ({})",
                algorithm.name(),
                key_kind(algorithm)
            ));
        }
        Ok(Self { keys })
    }

    /// The key for a token: the one with its `kid`; or, when the set has a single key
    /// without a `kid`, or the token names none and the set has a single key, that one.
    fn find(&self, kid: Option<&str>) -> Option<Arc<DecodingKey>> {
        if let Some(kid) = kid
            && let Some((_, key)) = self.keys.iter().find(|(k, _)| k.as_deref() == Some(kid))
        {
            return Some(key.clone());
        }
        match self.keys.as_slice() {
            [(None, key)] => Some(key.clone()),
            [(Some(_), key)] if kid.is_none() => Some(key.clone()),
            _ => None,
        }
    }
}

/// Whether a JWK can verify signatures of the pinned algorithm.
fn suits(jwk: &Jwk, algorithm: JwtAlgorithm) -> bool {
    let common = &jwk.common;
    if common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return false;
    }
    if common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return false;
    }
    if common
        .key_algorithm
        .is_some_and(|alg| alg.to_string() != algorithm.name())
    {
        return false;
    }
    match (&jwk.algorithm, algorithm) {
        (AlgorithmParameters::RSA(_), JwtAlgorithm::RS256) => true,
        (AlgorithmParameters::EllipticCurve(p), JwtAlgorithm::ES256) => {
            p.curve == EllipticCurve::P256
        }
        (AlgorithmParameters::OctetKeyPair(p), JwtAlgorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey};
    use serde_json::json;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    #[test]
    fn jwks_documents_keep_the_keys_that_suit_the_algorithm() {
        let ec = |kid: &str| {
            let private = std::fs::read(fixture("ec_private.pem")).unwrap();
            let key = EncodingKey::from_ec_pem(&private).unwrap();
            let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
            jwk.common.key_id = Some(kid.into());
            serde_json::to_value(jwk).unwrap()
        };
        let doc = json!({"keys": [
            ec("a"),
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "use": "enc", "kid": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "weird", "kid": "w"},
            ec("b"),
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes(), JwtAlgorithm::ES256).unwrap();
        assert_eq!(set.keys.len(), 2);
        assert!(set.find(Some("a")).is_some() && set.find(Some("b")).is_some());
        assert!(set.find(Some("enc")).is_none() && set.find(None).is_none());

        let e = KeySet::parse(doc.to_string().as_bytes(), JwtAlgorithm::RS256)
            .err()
            .unwrap();
        assert!(e.contains("no RS256"), "{e}");
        let twice = json!({"keys": [ec("a"), ec("a")]});
        assert!(
            KeySet::parse(twice.to_string().as_bytes(), JwtAlgorithm::ES256)
                .err()
                .unwrap()
                .contains("two keys")
        );
        let one = json!({"keys": [ec("a")]});
        let set = KeySet::parse(one.to_string().as_bytes(), JwtAlgorithm::ES256).unwrap();
        assert!(set.find(None).is_some() && set.find(Some("z")).is_none());
    }
}
