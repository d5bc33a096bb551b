//! In-process fan-out of "session S has events up to seq N" to the SSE streams of this
//! API process. A subscriber holds a `watch` receiver: it learns the latest seq and reads
//! the rows from the table itself, so a slow subscriber never queues anything here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{broadcast, watch};

use crate::domain::SessionId;

/// Notifications buffered for the all-sessions feed; a subscriber that falls further behind
/// re-reads the tables (it is told it lagged).
const FIREHOSE_CAPACITY: usize = 4096;

/// Wakes subscribers of a session when its events advance.
#[derive(Debug, Clone)]
pub struct EventHub {
    sessions: Arc<Mutex<HashMap<SessionId, watch::Sender<i64>>>>,
    /// Every `(session, seq)` notification, for streams that follow many sessions (the
    /// OpenCode `/event` feeds); sent only while someone listens.
    all: broadcast::Sender<(SessionId, i64)>,
    /// Bumped after a listener reconnect: notifications may have been lost, so everyone
    /// re-reads the table.
    epoch: Arc<watch::Sender<u64>>,
}

/// A subscription to one session's wake-ups.
#[derive(Debug)]
pub struct Subscription {
    pub seq: watch::Receiver<i64>,
    pub epoch: watch::Receiver<u64>,
    session: SessionId,
    hub: EventHub,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            sessions: Arc::default(),
            all: broadcast::channel(FIREHOSE_CAPACITY).0,
            epoch: Arc::default(),
        }
    }
}

impl EventHub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows every session's notifications (subscribe before reading the tables).
    pub fn subscribe_all(&self) -> broadcast::Receiver<(SessionId, i64)> {
        self.all.subscribe()
    }

    /// The epoch receiver: it changes when notifications may have been lost.
    pub fn epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Subscribes to a session; do this before reading the backlog so nothing slips by.
    pub fn subscribe(&self, session: SessionId) -> Subscription {
        let mut map = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = map.entry(session).or_insert_with(|| watch::channel(0).0);
        Subscription {
            seq: sender.subscribe(),
            epoch: self.epoch.subscribe(),
            session,
            hub: self.clone(),
        }
    }

    /// Records that `session` has events up to `seq`.
    pub fn publish(&self, session: SessionId, seq: i64) {
        if self.all.receiver_count() > 0 {
            // An error only means the last receiver just left.
            let _ = self.all.send((session, seq));
        }
        let mut map = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = map.get(&session) {
            if sender.receiver_count() == 0 {
                map.remove(&session);
                return;
            }
            sender.send_if_modified(|current| {
                let advanced = seq > *current;
                if advanced {
                    *current = seq;
                }
                advanced
            });
        }
    }

    /// Wakes every subscriber (after a listener reconnect).
    pub fn wake_all(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Number of sessions with live subscribers (for metrics and tests).
    pub fn len(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self
            .hub
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // This receiver is still counted while we run; 1 means we were the last one.
        if map
            .get(&self.session)
            .is_some_and(|s| s.receiver_count() <= 1)
        {
            map.remove(&self.session);
        }
    }
}

impl Subscription {
    /// Waits until the session advances past what this subscriber has seen, or the hub asks
    /// everyone to re-read. Returns `false` if the hub is gone.
    pub async fn changed(&mut self) -> bool {
        tokio::select! {
            r = self.seq.changed() => r.is_ok(),
            r = self.epoch.changed() => r.is_ok(),
        }
    }
}

impl super::listener::Handler for EventHub {
    fn notify(&self, channel: &str, payload: &str) {
        if channel != super::EVENTS_CHANNEL {
            return;
        }
        // Payload: `<session_id>:<seq>`; anything else is ignored (never ours).
        let parsed = payload
            .split_once(':')
            .and_then(|(s, n)| Some((s.parse::<SessionId>().ok()?, n.parse::<i64>().ok()?)));
        if let Some((session, seq)) = parsed {
            self.publish(session, seq);
        }
    }

    fn resync(&self) {
        self.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_wake_on_newer_seqs_only_and_clean_up() {
        let hub = EventHub::new();
        let s = SessionId::new_random();
        let mut sub = hub.subscribe(s);
        hub.publish(s, 3);
        assert!(sub.changed().await);
        assert_eq!(*sub.seq.borrow_and_update(), 3);
        hub.publish(s, 2);
        assert!(!sub.seq.has_changed().unwrap());
        hub.publish(SessionId::new_random(), 9);
        assert_eq!(hub.len(), 1);
        drop(sub);
        assert!(hub.is_empty());
    }

    #[tokio::test]
    async fn wake_all_reaches_every_subscriber() {
        let hub = EventHub::new();
        let mut a = hub.subscribe(SessionId::new_random());
        let mut b = hub.subscribe(SessionId::new_random());
        hub.wake_all();
        assert!(a.changed().await);
        assert!(b.changed().await);
    }
}
