//! OpenCode's event streams: `GET /event` (one directory) and `GET /global/event` (every
//! directory, each event wrapped as `{directory, project, payload}`). Framing is exactly
//! OpenCode's: `data: <one-line JSON>` and a blank line, LF only, nothing else — the first
//! event is `server.connected`, then `server.heartbeat` every 10 s.
//!
//! A stream follows every session of the caller's tenant through the hub's all-sessions
//! feed, reads each session's new rows from the table (so a lost notification costs
//! latency, never data: a lag or a listener reconnect re-reads every session) and
//! translates them with a per-session [`Transcript`].
//!
//! Backpressure: a notification only marks its session as behind; rows are read one page
//! at a time, only after hyper has taken every frame of the previous page. Once a stalled
//! client's socket and hyper's buffer are full, the reads stop: the stream holds at most
//! one page of frames however far behind the client falls (docs/backpressure.md).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::{Caller, OcError, Scope};
use crate::app::AppState;
use crate::domain::{SessionId, TenantId};
use crate::opencode::ids::{self, Kind};
use crate::opencode::translate::{Ctx, OcEvent, Transcript};
use crate::opencode::view;
use crate::store::{self, sessions};

const HEARTBEAT: Duration = Duration::from_secs(10);
/// Rows read per query.
const PAGE: i64 = 256;

/// `GET /event`: the events of the caller's directory (or the default one).
pub async fn directory_events(
    State(state): State<AppState>,
    caller: Caller,
    scope: Scope,
) -> Result<Response, OcError> {
    let dir = scope
        .directory
        .unwrap_or_else(|| view::default_directory(&state.settings));
    start(state, caller.0.tenant_id, Some(dir)).await
}

/// `GET /global/event`: the events of every directory, as the TUI listens.
pub async fn global_events(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, OcError> {
    start(state, caller.0.tenant_id, None).await
}

async fn start(
    state: AppState,
    tenant: TenantId,
    directory: Option<String>,
) -> Result<Response, OcError> {
    // Subscribe first, then take the positions: nothing committed in between is missed.
    let rx = state.hub.subscribe_all();
    let epoch = state.hub.epoch();
    let start: HashMap<SessionId, i64> = sessions::event_positions(&state.pool, tenant)
        .await?
        .into_iter()
        .collect();
    let mut feed = Feed {
        default_dir: view::default_directory(&state.settings),
        state,
        tenant,
        directory,
        rx,
        epoch,
        start,
        tracks: HashMap::new(),
        behind: VecDeque::new(),
        out: VecDeque::new(),
        heartbeat: heartbeat(),
    };
    feed.push_server("server.connected");
    let body = Body::from_stream(futures::stream::unfold(feed, |mut feed| async move {
        let frame = feed.next().await?;
        Some((Ok::<_, Infallible>(frame), feed))
    }));
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The heartbeat timer. A client that stopped reading gets one heartbeat when it resumes,
/// not one for every 10 s it was away.
fn heartbeat() -> tokio::time::Interval {
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat
}

/// One followed session: where its stream stands, and its translation state (`None`: the
/// session is not in this stream's scope).
struct Track {
    cursor: i64,
    transcript: Option<Transcript>,
    directory: String,
    /// Queued in [`Feed::behind`]: it has rows after `cursor` not read yet.
    behind: bool,
}

struct Feed {
    state: AppState,
    tenant: TenantId,
    /// `None` for the global stream.
    directory: Option<String>,
    default_dir: String,
    rx: broadcast::Receiver<(SessionId, i64)>,
    epoch: watch::Receiver<u64>,
    /// Where each session that existed at connect time stood then.
    start: HashMap<SessionId, i64>,
    tracks: HashMap<SessionId, Track>,
    /// Sessions with unread rows, in turn: each gets one page, then goes to the back.
    behind: VecDeque<SessionId>,
    /// Frames of the last page (or a heartbeat) not taken by the client yet.
    out: VecDeque<Bytes>,
    heartbeat: tokio::time::Interval,
}

/// `data: <json>` + blank line, LF only.
fn frame(v: &Value) -> Bytes {
    let mut s = String::from("data: ");
    s.push_str(&v.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}

impl Feed {
    fn push_server(&mut self, kind: &str) {
        let ev = json!({"id": ids::fresh(Kind::Event), "type": kind, "properties": {}});
        let v = if self.directory.is_some() {
            ev
        } else {
            json!({"payload": ev})
        };
        self.out.push_back(frame(&v));
    }

    fn push(&mut self, directory: &str, ev: &OcEvent) {
        let v = if self.directory.is_some() {
            ev.to_json()
        } else {
            json!({"directory": directory, "project": "global", "payload": ev.to_json()})
        };
        self.out.push_back(frame(&v));
    }

    /// The next frame; `None` ends the stream (shutdown). hyper asks for it only when its
    /// write buffer has room, so rows are read at the pace the client reads.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(f) = self.out.pop_front() {
                return Some(f);
            }
            if self.state.shutdown.is_cancelled() {
                return None;
            }
            if let Some(session) = self.behind.pop_front() {
                self.read_page(session).await;
                continue;
            }
            tokio::select! {
                () = self.state.shutdown.cancelled() => return None,
                _ = self.heartbeat.tick() => self.push_server("server.heartbeat"),
                r = self.rx.recv() => match r {
                    Ok((session, seq)) => self.advance(session, seq).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.resync().await,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                r = self.epoch.changed() => {
                    if r.is_err() {
                        return None;
                    }
                    self.resync().await;
                }
            }
        }
    }

    /// Notifications may have been lost: re-read every session that moved.
    async fn resync(&mut self) {
        match sessions::event_positions(&self.state.pool, self.tenant).await {
            Ok(rows) => {
                for (session, seq) in rows {
                    self.advance(session, seq).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "opencode events: resync failed"),
        }
    }

    /// Session `session` has events up to `seq`: if this stream has not read them, queue the
    /// session for [`Self::read_page`]. Nothing is read here, so notifications cost no
    /// memory whatever the client does.
    async fn advance(&mut self, session: SessionId, seq: i64) {
        if !self.tracks.contains_key(&session) {
            let Some(track) = self.open(session).await else {
                return;
            };
            self.tracks.insert(session, track);
        }
        let Some(track) = self.tracks.get_mut(&session) else {
            return;
        };
        if track.transcript.is_none() || seq <= track.cursor || track.behind {
            return;
        }
        track.behind = true;
        self.behind.push_back(session);
    }

    /// Reads and translates one page of the session's rows after its cursor. A full page
    /// means there may be more: the session goes to the back of the queue, after the other
    /// sessions that are behind.
    async fn read_page(&mut self, session: SessionId) {
        let Some(cursor) = self.tracks.get(&session).map(|t| t.cursor) else {
            return;
        };
        let rows = match store::events::list(&self.state.pool, session, cursor, None, PAGE).await {
            Ok(rows) => rows,
            Err(e) => {
                // The next notification (or resync) for the session queues it again.
                tracing::warn!(error = %e, session.id = %session, "opencode events: read failed");
                if let Some(track) = self.tracks.get_mut(&session) {
                    track.behind = false;
                }
                return;
            }
        };
        let mut frames = Vec::new();
        for ev in &rows {
            let kind = ev.body.get("type").and_then(Value::as_str).unwrap_or("");
            if kind.starts_with("session.") && kind != "session.status" {
                self.refresh(session).await;
            }
            if let Some(track) = self.tracks.get_mut(&session)
                && let Some(tr) = track.transcript.as_mut()
            {
                let dir = track.directory.clone();
                frames.extend(tr.apply(ev).into_iter().map(|e| (dir.clone(), e)));
            }
        }
        for (dir, e) in &frames {
            self.push(dir, e);
        }
        let Some(track) = self.tracks.get_mut(&session) else {
            return;
        };
        if let Some(last) = rows.last() {
            track.cursor = last.seq;
        }
        if rows.len() as i64 == PAGE {
            self.behind.push_back(session);
        } else {
            track.behind = false;
        }
    }

    /// Starts following a session: checks it is the tenant's and in scope.
    async fn open(&mut self, session: SessionId) -> Option<Track> {
        let row = match sessions::get_any(&self.state.pool, session).await {
            Ok(Some(row)) => row,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, session.id = %session, "opencode events: lookup failed");
                return None;
            }
        };
        // Sessions that existed at connect time start where they stood; newer ones at 0.
        let cursor = self.start.remove(&session).unwrap_or(0);
        let directory = view::directory_of(&row, &self.default_dir);
        let in_scope =
            row.tenant_id == self.tenant && self.directory.as_ref().is_none_or(|d| *d == directory);
        Some(Track {
            cursor,
            transcript: in_scope.then(|| Transcript::new(Ctx::of(&row, &self.default_dir), false)),
            directory,
            behind: false,
        })
    }

    /// Re-reads the session's settings (its title, …) for `session.*` events.
    async fn refresh(&mut self, session: SessionId) {
        if let Ok(Some(row)) = sessions::get_any(&self.state.pool, session).await
            && let Some(track) = self.tracks.get_mut(&session)
            && let Some(tr) = track.transcript.as_mut()
        {
            tr.set_ctx(Ctx::of(&row, &self.default_dir));
        }
    }
}
