//! API keys and the authenticated principal: key generation, hashing, role checks.

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
    /// `None` when auth is off (`--insecure-no-auth`).
    pub key_id: Option<ApiKeyId>,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// How the audit trail names this caller.
    pub fn actor(&self) -> String {
        match self.key_id {
            Some(id) => format!("key:{id}"),
            None => "anonymous".into(),
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
