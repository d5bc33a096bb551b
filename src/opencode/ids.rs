//! OpenCode ids: `<prefix>_` + 12 hex + 14 base62. The hex is the low 48 bits of
//! `ms × 4096 + counter`, so ids sort by time. Session ids come from the database (see the
//! `opencode_id` SQL function); message, part and event ids are derived here from the
//! stored event that created the object, so every API node names it the same way without
//! storing anything.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::domain::SessionId;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const MASK48: i64 = 0xffff_ffff_ffff;

/// Which object an id names; also the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message,
    Part,
    Event,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Message => "msg",
            Self::Part => "prt",
            Self::Event => "evt",
        }
    }
}

/// The id of the `index`-th object of `kind` created by event `seq` of `session` (written at
/// `at`). Stable: the same inputs always give the same id; ascending within a session as
/// long as events are (at most 512 objects per event keep the counter apart).
pub fn derive(kind: Kind, session: SessionId, seq: i64, index: u32, at: DateTime<Utc>) -> String {
    let counter = (seq.wrapping_mul(8) + i64::from(index)) & 0xfff;
    let time = (at.timestamp_millis().wrapping_mul(4096) + counter) & MASK48;
    let digest = Sha256::new()
        .chain_update(kind.prefix())
        .chain_update(session.0.as_bytes())
        .chain_update(seq.to_le_bytes())
        .chain_update(index.to_le_bytes())
        .finalize();
    let mut id = String::with_capacity(31);
    id.push_str(kind.prefix());
    id.push('_');
    id.push_str(&format!("{time:012x}"));
    id.extend(
        digest
            .iter()
            .take(14)
            .map(|b| char::from(BASE62[usize::from(*b) % BASE62.len()])),
    );
    id
}

/// An id of a fresh object not derived from an event (e.g. a heartbeat's event id).
pub fn fresh(kind: Kind) -> String {
    let mut id = String::with_capacity(31);
    let now = Utc::now().timestamp_millis().wrapping_mul(4096) & MASK48;
    id.push_str(kind.prefix());
    id.push('_');
    id.push_str(&format!("{now:012x}"));
    id.extend((0..14).map(|_| char::from(BASE62[rand::random_range(0..BASE62.len())])));
    id
}

/// Whether `s` looks like an OpenCode id with this prefix (`ses`, `msg`, …).
pub fn has_prefix(s: &str, prefix: &str) -> bool {
    s.len() > prefix.len() + 1
        && s.starts_with(prefix)
        && s.as_bytes()[prefix.len()] == b'_'
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_well_formed_and_time_ordered() {
        let s = SessionId::new_random();
        let t0 = Utc::now();
        let a = derive(Kind::Message, s, 5, 0, t0);
        assert_eq!(a, derive(Kind::Message, s, 5, 0, t0));
        assert_eq!(a.len(), 4 + 12 + 14);
        assert!(has_prefix(&a, "msg"));
        let b = derive(Kind::Message, s, 6, 0, t0);
        let c = derive(
            Kind::Message,
            s,
            7,
            0,
            t0 + chrono::Duration::milliseconds(1),
        );
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_ne!(
            derive(Kind::Part, s, 5, 0, t0),
            derive(Kind::Part, s, 5, 1, t0)
        );
        assert!(fresh(Kind::Event).starts_with("evt_"));
        assert!(!has_prefix("msgx", "msg"));
        assert!(!has_prefix("ses_a/b", "ses"));
    }
}
