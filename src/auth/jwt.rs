//! JWT bearer tokens beside API keys, checked the way RFC 8725 asks: one issuer, one
//! audience, one algorithm pinned by the configuration (never taken from the token; `none`
//! never), `exp` required and `nbf` honoured within a small leeway, and the tenant and
//! role read from configured claims. Keys come from the configuration only: a token's own
//! `jwk`, `jku` or `x5u` headers are ignored, never fetched.

mod keys;

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use crate::config::{JwtAlgorithm, JwtSettings};
use crate::domain::{Role, TenantName};
use keys::{Keys, load_keys};

/// Registered claims (RFC 7519 §4.1): the tenant and role claims may not be one of them.
const REGISTERED_CLAIMS: &[&str] = &["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];
/// RFC 8725 asks for a small clock-skew allowance.
const MAX_LEEWAY: Duration = Duration::from_secs(60);
/// The `sub` names the caller in the audit trail; longer ones are refused.
const MAX_SUBJECT_CHARS: usize = 255;
/// Anything longer is refused before it is decoded.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A configuration problem with `auth.jwt`, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("key `auth.jwt.{key}`: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

fn config_error(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        reason: reason.into(),
    }
}

/// Why a token was refused. The text goes to the client: short, and saying nothing about
/// the server's keys or settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not accepted")]
    Algorithm,
    #[error("token header not accepted")]
    Header,
    #[error("token key not known")]
    UnknownKey,
    #[error("invalid token signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token issuer not accepted")]
    Issuer,
    #[error("token audience not accepted")]
    Audience,
    #[error("token lacks the `{0}` claim")]
    MissingClaim(String),
    #[error("token claim `{0}` is invalid")]
    InvalidClaim(String),
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone)]
pub struct Verified {
    /// `sub`.
    pub subject: String,
    pub tenant: TenantName,
    pub role: Role,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Verifies tokens against `auth.jwt`. Built once per process.
pub struct Verifier {
    algorithm: JwtAlgorithm,
    validation: Validation,
    issuer: String,
    audience: String,
    keys: Keys,
    tenant_claim: String,
    role_claim: String,
    required_typ: Option<String>,
    /// Create a token's tenant on first use (else such tokens are refused).
    pub auto_create_tenants: bool,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

impl JwtAlgorithm {
    fn pinned(self) -> Algorithm {
        match self {
            Self::HS256 => Algorithm::HS256,
            Self::RS256 => Algorithm::RS256,
            Self::ES256 => Algorithm::ES256,
            Self::EdDSA => Algorithm::EdDSA,
        }
    }

    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            Self::HS256 => "HS256",
            Self::RS256 => "RS256",
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
        }
    }
}

impl Verifier {
    /// Checks the settings and loads the key material; the error names the offending key.
    pub fn new(s: &JwtSettings) -> Result<Self, ConfigError> {
        if s.issuer.trim().is_empty() {
            return Err(config_error("issuer", "must not be empty"));
        }
        if s.audience.trim().is_empty() {
            return Err(config_error("audience", "must not be empty"));
        }
        if s.leeway > MAX_LEEWAY {
            return Err(config_error("leeway", "must be at most 60s"));
        }
        for (key, claim) in [
            ("tenant_claim", &s.tenant_claim),
            ("role_claim", &s.role_claim),
        ] {
            if claim.is_empty() || REGISTERED_CLAIMS.contains(&claim.as_str()) {
                return Err(config_error(
                    key,
                    "must name a claim of its own (not empty, not iss/sub/aud/exp/nbf/iat/jti)",
                ));
            }
        }
        if s.tenant_claim == s.role_claim {
            return Err(config_error("role_claim", "must differ from tenant_claim"));
        }
        if s.required_typ.as_ref().is_some_and(|t| t.trim().is_empty()) {
            return Err(config_error("required_typ", "must not be empty when set"));
        }
        let keys = load_keys(s)?;

        let mut validation = Validation::new(s.algorithm.pinned());
        validation.leeway = s.leeway.as_secs();
        validation.validate_exp = true;
        // Checked when present; not required, as many issuers do not send it.
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&s.issuer]);
        validation.set_audience(&[&s.audience]);
        Ok(Self {
            algorithm: s.algorithm,
            validation,
            issuer: s.issuer.clone(),
            audience: s.audience.clone(),
            keys,
            tenant_claim: s.tenant_claim.clone(),
            role_claim: s.role_claim.clone(),
            required_typ: s.required_typ.clone(),
            auto_create_tenants: s.auto_create_tenants,
        })
    }

    /// Verifies a compact JWS and reads its bearer from the claims.
    pub async fn verify(&self, token: &str) -> Result<Verified, Rejection> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Rejection::Malformed);
        }
        let kid = self.check_header(token)?;
        let key = match &self.keys {
            Keys::Single(key) => key.clone(),
            Keys::Jwks(file) => file.key(kid.as_deref()).await?,
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &self.validation)
            .map_err(rejection)?;
        self.bearer(&data.claims)
    }

    /// The header, checked before anything else: the pinned `alg` exactly, no critical
    /// extensions (we understand none, RFC 7515 §4.1.11), the `typ` when one is required.
    /// Returns the `kid`.
    fn check_header(&self, token: &str) -> Result<Option<String>, Rejection> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Rejection::Malformed);
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| Rejection::Malformed)?;
        let header: Map<String, Value> =
            serde_json::from_slice(&bytes).map_err(|_| Rejection::Malformed)?;
        if header.get("alg").and_then(Value::as_str) != Some(self.algorithm.name()) {
            return Err(Rejection::Algorithm);
        }
        if header.contains_key("crit") {
            return Err(Rejection::Header);
        }
        if let Some(want) = &self.required_typ {
            let typ = header.get("typ").and_then(Value::as_str).unwrap_or("");
            // RFC 7515 §4.1.9: media types compare case-insensitively, `application/` may
            // be left out.
            let typ = match typ.get(..12) {
                Some(p) if p.eq_ignore_ascii_case("application/") => &typ[12..],
                _ => typ,
            };
            if !typ.eq_ignore_ascii_case(want.trim_start_matches("application/")) {
                return Err(Rejection::Header);
            }
        }
        match header.get("kid") {
            None => Ok(None),
            Some(Value::String(kid)) => Ok(Some(kid.clone())),
            Some(_) => Err(Rejection::Header),
        }
    }

    /// The bearer from verified claims. `iss` must be the one configured string (the
    /// library also accepts an array that contains it).
    fn bearer(&self, claims: &Map<String, Value>) -> Result<Verified, Rejection> {
        match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.issuer => {}
            _ => return Err(Rejection::Issuer),
        }
        let subject = match claims.get("sub") {
            Some(Value::String(sub))
                if !sub.is_empty()
                    && sub.chars().count() <= MAX_SUBJECT_CHARS
                    && !sub.chars().any(char::is_control) =>
            {
                sub.clone()
            }
            Some(_) => return Err(Rejection::InvalidClaim("sub".into())),
            None => return Err(Rejection::MissingClaim("sub".into())),
        };
        let tenant = match claims.get(&self.tenant_claim) {
            Some(Value::String(name)) => TenantName::parse(name)
                .map_err(|_| Rejection::InvalidClaim(self.tenant_claim.clone()))?,
            Some(_) => return Err(Rejection::InvalidClaim(self.tenant_claim.clone())),
            None => return Err(Rejection::MissingClaim(self.tenant_claim.clone())),
        };
        // Only `admin` grants anything; any other value, or none, is a plain user. Arrays
        // are what many identity providers send for roles.
        let role = match claims.get(&self.role_claim) {
            None | Some(Value::Null) => Role::User,
            Some(Value::String(role)) if role == "admin" => Role::Admin,
            Some(Value::String(_)) => Role::User,
            Some(Value::Array(roles)) if roles.iter().all(Value::is_string) => {
                if roles.iter().any(|r| r == "admin") {
                    Role::Admin
                } else {
                    Role::User
                }
            }
            Some(_) => return Err(Rejection::InvalidClaim(self.role_claim.clone())),
        };
        // Present and numeric: the library has checked it.
        let expires_at = match claims.get("exp") {
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().map(|f| f as u64))
                .ok_or_else(|| Rejection::InvalidClaim("exp".into()))?,
            _ => return Err(Rejection::InvalidClaim("exp".into())),
        };
        Ok(Verified {
            subject,
            tenant,
            role,
            expires_at,
        })
    }
}

/// The library's verdict in our words.
fn rejection(e: jsonwebtoken::errors::Error) -> Rejection {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => Rejection::Signature,
        K::ExpiredSignature => Rejection::Expired,
        K::ImmatureSignature => Rejection::NotYetValid,
        K::InvalidIssuer => Rejection::Issuer,
        K::InvalidAudience => Rejection::Audience,
        K::InvalidAlgorithm | K::MissingAlgorithm => Rejection::Algorithm,
        K::MissingRequiredClaim(claim) => Rejection::MissingClaim(claim.clone()),
        K::InvalidClaimFormat(claim) => Rejection::InvalidClaim(claim.clone()),
        K::InvalidRsaKey(_)
        | K::InvalidEcdsaKey
        | K::InvalidEddsaKey
        | K::InvalidKeyFormat
        | K::Provider(_) => {
            // Keys are checked at load, so this is the server's problem, not the token's.
            tracing::warn!(error = %e, "a JWT could not be checked against the configured key");
            Rejection::Signature
        }
        _ => Rejection::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use crate::config::Secret;
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    fn settings(algorithm: JwtAlgorithm) -> JwtSettings {
        JwtSettings {
            issuer: "https://idp.example".into(),
            audience: "hotplex".into(),
            algorithm,
            hs256_secret: (algorithm == JwtAlgorithm::HS256).then(|| Secret::new(SECRET)),
            public_key_pem: None,
            jwks_file: None,
            leeway: Duration::from_secs(30),
            tenant_claim: "tenant".into(),
            role_claim: "role".into(),
            required_typ: None,
            auto_create_tenants: false,
        }
    }

    fn claims() -> Value {
        let now = get_current_timestamp();
        json!({"iss": "https://idp.example", "aud": "hotplex", "sub": "alice",
               "tenant": "acme", "exp": now + 300, "nbf": now - 10})
    }

    fn hs256(claims: &Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    /// A token with any header, signed with the HS256 secret.
    fn with_header(header: Value, claims: &Value) -> String {
        let b64 = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        let message = format!("{}.{}", b64(&header), b64(claims));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{message}.{signature}")
    }

    #[tokio::test]
    async fn a_valid_token_names_subject_tenant_and_role() {
        let v = Verifier::new(&settings(JwtAlgorithm::HS256)).unwrap();
        let ok = v.verify(&hs256(&claims())).await.unwrap();
        assert_eq!(ok.subject, "alice");
        assert_eq!(ok.tenant.as_str(), "acme");
        assert_eq!(ok.role, Role::User);
        for (role, expected) in [
            (json!("admin"), Role::Admin),
            (json!(["reader", "admin"]), Role::Admin),
            (json!("Admin"), Role::User),
            (json!(["reader"]), Role::User),
            (json!(null), Role::User),
        ] {
            let mut c = claims();
            c["role"] = role.clone();
            assert_eq!(v.verify(&hs256(&c)).await.unwrap().role, expected, "{role}");
        }
    }

    #[tokio::test]
    async fn headers_other_than_the_pinned_algorithm_are_refused() {
        let v = Verifier::new(&settings(JwtAlgorithm::HS256)).unwrap();
        let c = claims();
        for (header, why) in [
            (json!({"alg": "none"}), Rejection::Algorithm),
            (json!({"alg": "HS512"}), Rejection::Algorithm),
            (json!({"alg": "hs256"}), Rejection::Algorithm),
            (json!({"typ": "JWT"}), Rejection::Algorithm),
            (json!({"alg": "HS256", "crit": ["exp"]}), Rejection::Header),
            (json!({"alg": "HS256", "kid": 7}), Rejection::Header),
        ] {
            assert_eq!(
                v.verify(&with_header(header.clone(), &c))
                    .await
                    .unwrap_err(),
                why,
                "{header}"
            );
        }
        let unsigned = format!(
            "{}.",
            with_header(json!({"alg": "none"}), &c)
                .rsplit_once('.')
                .unwrap()
                .0
        );
        assert_eq!(v.verify(&unsigned).await.unwrap_err(), Rejection::Algorithm);
        for junk in ["", "a.b", "a.b.c.d", "!!.e30.x", "e30.e30.e30"] {
            assert!(v.verify(junk).await.is_err(), "{junk}");
        }
    }

    #[tokio::test]
    async fn a_required_typ_is_enforced() {
        let mut s = settings(JwtAlgorithm::HS256);
        s.required_typ = Some("at+jwt".into());
        let v = Verifier::new(&s).unwrap();
        let c = claims();
        for typ in ["at+jwt", "AT+JWT", "application/at+jwt"] {
            let token = with_header(json!({"alg": "HS256", "typ": typ}), &c);
            assert!(v.verify(&token).await.is_ok(), "{typ}");
        }
        for header in [
            json!({"alg": "HS256", "typ": "JWT"}),
            json!({"alg": "HS256"}),
        ] {
            assert_eq!(
                v.verify(&with_header(header, &c)).await.unwrap_err(),
                Rejection::Header
            );
        }
    }

    #[tokio::test]
    async fn claims_are_checked() {
        let v = Verifier::new(&settings(JwtAlgorithm::HS256)).unwrap();
        let now = get_current_timestamp();
        let cases: Vec<(&str, Value, Rejection)> = vec![
            ("iss", json!("https://other.example"), Rejection::Issuer),
            (
                "iss",
                json!(["https://idp.example", "x"]),
                Rejection::Issuer,
            ),
            ("aud", json!("other"), Rejection::Audience),
            ("exp", json!(now - 31), Rejection::Expired),
            ("nbf", json!(now + 31), Rejection::NotYetValid),
            ("sub", json!(""), Rejection::InvalidClaim("sub".into())),
            // The library counts a `sub` that is not a string as missing.
            ("sub", json!(7), Rejection::MissingClaim("sub".into())),
            (
                "tenant",
                json!("Not A Tenant"),
                Rejection::InvalidClaim("tenant".into()),
            ),
            ("tenant", json!(1), Rejection::InvalidClaim("tenant".into())),
            (
                "role",
                json!({"admin": true}),
                Rejection::InvalidClaim("role".into()),
            ),
            ("role", json!([1]), Rejection::InvalidClaim("role".into())),
        ];
        for (claim, value, why) in cases {
            let mut c = claims();
            c[claim] = value.clone();
            assert_eq!(
                v.verify(&hs256(&c)).await.unwrap_err(),
                why,
                "{claim}: {value}"
            );
        }
        for claim in ["exp", "iss", "aud", "sub", "tenant"] {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(claim);
            assert_eq!(
                v.verify(&hs256(&c)).await.unwrap_err(),
                Rejection::MissingClaim(claim.into()),
                "{claim}"
            );
        }
        // Within the leeway, and with an audience array that names us.
        let mut c = claims();
        c["exp"] = json!(now - 5);
        c["nbf"] = json!(now + 5);
        c["aud"] = json!(["other", "hotplex"]);
        v.verify(&hs256(&c)).await.unwrap();
        // Another secret: a bad signature.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(b"another secret of 32 bytes or more"),
        )
        .unwrap();
        assert_eq!(v.verify(&forged).await.unwrap_err(), Rejection::Signature);
    }

    #[tokio::test]
    async fn ed25519_keys_verify_eddsa() {
        let mut s = settings(JwtAlgorithm::EdDSA);
        s.public_key_pem = Some(fixture("ed25519_public.pem"));
        let v = Verifier::new(&s).unwrap();
        let private = std::fs::read(fixture("ed25519_private.pem")).unwrap();
        let token = encode(
            &Header::new(Algorithm::EdDSA),
            &claims(),
            &EncodingKey::from_ed_pem(&private).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&token).await.unwrap().subject, "alice");
        assert_eq!(
            v.verify(&hs256(&claims())).await.unwrap_err(),
            Rejection::Algorithm
        );
    }

    #[test]
    fn bad_settings_name_their_key() {
        let err = |s: &JwtSettings| Verifier::new(s).unwrap_err();
        let mut s = settings(JwtAlgorithm::HS256);
        s.leeway = Duration::from_secs(61);
        assert_eq!(err(&s).key, "leeway");
        let mut s = settings(JwtAlgorithm::HS256);
        s.hs256_secret = Some(Secret::new("short"));
        assert_eq!(err(&s).key, "hs256_secret");
        let mut s = settings(JwtAlgorithm::HS256);
        s.public_key_pem = Some(fixture("rsa_public.pem"));
        assert_eq!(err(&s).key, "algorithm");
        let mut s = settings(JwtAlgorithm::RS256);
        assert_eq!(err(&s).key, "public_key_pem");
        s.hs256_secret = Some(Secret::new(SECRET));
        assert_eq!(err(&s).key, "hs256_secret");
        let mut s = settings(JwtAlgorithm::HS256);
        s.tenant_claim = "sub".into();
        assert_eq!(err(&s).key, "tenant_claim");
        let mut s = settings(JwtAlgorithm::HS256);
        s.role_claim = "tenant".into();
        assert_eq!(err(&s).key, "role_claim");

        let pem = |alg: JwtAlgorithm, file: &str| {
            let mut s = settings(alg);
            s.public_key_pem = Some(fixture(file));
            Verifier::new(&s).map(|_| ()).map_err(|e| e.to_string())
        };
        pem(JwtAlgorithm::RS256, "rsa_public.pem").unwrap();
        pem(JwtAlgorithm::ES256, "ec_public.pem").unwrap();
        for (alg, file, says) in [
            (JwtAlgorithm::RS256, "rsa_private.pem", "private key"),
            (JwtAlgorithm::RS256, "rsa_1024_public.pem", "1024 bits"),
            (JwtAlgorithm::RS256, "ec_public.pem", "RSA"),
            (JwtAlgorithm::ES256, "ec_p384_public.pem", "P-256"),
            (JwtAlgorithm::ES256, "rsa_public.pem", "P-256"),
            (JwtAlgorithm::EdDSA, "ec_public.pem", "Ed25519"),
            (JwtAlgorithm::RS256, "no-such-file.pem", "no-such-file.pem"),
        ] {
            let e = pem(alg, file).unwrap_err();
            assert!(
                e.contains("auth.jwt.public_key_pem") && e.contains(says),
                "{file}: {e}"
            );
        }
    }
}
