//! API keys and the authenticated principal: key generation, hashing, role checks. JWTs
//! from a configured issuer are the other way in ([`jwt`]).

pub mod jwt;

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

use crate::domain::{ApiKeyId, Role, TenantId};

/// Every key starts with this, so leaked keys are easy to recognise (secret scanners).
pub const KEY_PREFIX: &str = "hpx_";
/// Random characters after the prefix: 40 base62 characters ≈ 238 bits.
const KEY_RANDOM_LEN: usize = 40;
/// Characters of a key shown in listings.
const DISPLAY_LEN: usize = 12;

/// A fresh API key secret.
pub fn generate_key() -> String {
    let random: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(KEY_RANDOM_LEN)
        .map(char::from)
        .collect();
    format!("{KEY_PREFIX}{random}")
}

/// What is stored and looked up: SHA-256 of the secret. Keys are long random strings, so a
/// slow password hash would add latency to every request and no security.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The non-secret head of a key, for listings.
pub fn display_prefix(key: &str) -> String {
    key.chars().take(DISPLAY_LEN).collect()
}

/// Who is calling: the tenant every query is scoped to, and what they may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant_id: TenantId,
    pub tenant_name: String,
    /// The API key presented; `None` for a JWT, and when auth is off (`--insecure-no-auth`).
    pub key_id: Option<ApiKeyId>,
    /// The `sub` of the JWT presented, if the caller came with one.
    pub subject: Option<String>,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// How the audit trail names this caller.
    pub fn actor(&self) -> String {
        match (&self.key_id, &self.subject) {
            (Some(id), _) => format!("key:{id}"),
            (None, Some(sub)) => format!("jwt:{sub}"),
            (None, None) => "anonymous".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_random_and_hashed_stably() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + KEY_RANDOM_LEN);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
        assert_eq!(display_prefix(&a).len(), DISPLAY_LEN);
    }
}

/// Authenticated keys of this API process, so a request costs no database round trip for
/// its key. Entries expire after [`KeyCache::TTL`]; any change to `api_keys` (revoke, by the
/// API, the CLI or plain SQL) fires a NOTIFY on [`KEYS_CHANNEL`] that empties the cache at
/// once, and so does a reconnect of the LISTEN connection (a notification may have been
/// missed).
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], (Principal, std::time::Instant)>>,
}

/// Channel of the `api_keys` change trigger.
pub const KEYS_CHANNEL: &str = "hotplex_keys";

impl KeyCache {
    /// The longest a cached key is trusted without a notification.
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(10);
    /// Past this many keys the cache starts over rather than grow.
    const MAX: usize = 10_000;

    pub fn get(&self, hash: &[u8; 32]) -> Option<Principal> {
        let entries = self.lock();
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < Self::TTL)
            .map(|(p, _)| p.clone())
    }

    pub fn insert(&self, hash: [u8; 32], principal: Principal) {
        let mut entries = self.lock();
        if entries.len() >= Self::MAX {
            entries.clear();
        }
        entries.insert(hash, (principal, std::time::Instant::now()));
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<[u8; 32], (Principal, std::time::Instant)>,
    > {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn cached_keys_are_served_until_cleared() {
        let cache = KeyCache::default();
        let hash = hash_key("hpx_x");
        assert!(cache.get(&hash).is_none());
        cache.insert(
            hash,
            Principal {
                tenant_id: TenantId(uuid::Uuid::nil()),
                tenant_name: "t".into(),
                key_id: None,
                subject: None,
                role: Role::User,
            },
        );
        assert_eq!(cache.get(&hash).map(|p| p.tenant_name), Some("t".into()));
        cache.clear();
        assert!(cache.get(&hash).is_none());
    }
}
