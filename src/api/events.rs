//! `GET /v1/sessions/{id}/events`: the session's events as Server-Sent Events, replayed from
//! the table after `Last-Event-ID` (or `?after=`), then followed live. The stream subscribes
//! before it reads, and only ever reads the table in seq order, so it has no gap and no
//! duplicate whatever the notifications do.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;

use super::docs::{AuthErrors, NotFoundError, ParamErrors};
use super::error::ApiError;
use super::extract::{AppPath, AppQuery};
use super::sessions::SessionPath;
use super::tags::EVENTS;
use crate::app::AppState;
use crate::auth::Principal;
use crate::domain::{SessionId, TurnId};
use crate::events::SessionEvent;
use crate::events::hub::Subscription;
use crate::store::{self, sessions};

/// Rows read per query while replaying.
const PAGE: i64 = 256;
/// Re-read the table this often even without a wake-up (a lost notification costs at most
/// this much latency).
const SAFETY_POLL: Duration = Duration::from_secs(10);

/// Where the stream starts and what it carries.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Replay events with a higher seq (default 0: everything). `Last-Event-ID` wins.
    pub after: Option<i64>,
    /// Only events of this turn.
    pub turn_id: Option<TurnId>,
}

/// Streams the session's events (`text/event-stream`). Each event has `id:` = its seq,
/// `event:` = its type, and `data:` = the event as JSON (`type`, `seq`, `turn_id`,
/// `created_at` and the type's fields). Reconnect with `Last-Event-ID` to get exactly what
/// was missed. Comments (`:`) keep the connection alive.
#[utoipa::path(get, path = "/sessions/{session_id}/events", tag = EVENTS, params(SessionPath, EventsQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this seq")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = SessionEvent),
        NotFoundError, ParamErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn stream_events(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(path): AppPath<SessionPath>,
    AppQuery(query): AppQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_header", "Last-Event-ID must be an event seq")
                })?,
        ),
        None => None,
    };
    let after = last_event_id.or(query.after).unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`after` must not be negative",
        ));
    }
    sessions::get(&state.pool, principal.tenant_id, path.session_id)
        .await?
        .ok_or_else(|| ApiError::not_found("session not found"))?;

    // Subscribe first, then read: an event committed in between is found by the read.
    let sub = state.hub.subscribe(path.session_id);
    let stream = event_stream(Follow {
        pool: state.pool.clone(),
        session: path.session_id,
        turn: query.turn_id,
        cursor: after,
        buf: VecDeque::new(),
        sub,
        shutdown: state.shutdown.clone(),
    });
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    let mut response = sse.into_response();
    // Proxies such as nginx must not buffer the stream.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

struct Follow {
    pool: PgPool,
    session: SessionId,
    turn: Option<TurnId>,
    cursor: i64,
    buf: VecDeque<SessionEvent>,
    sub: Subscription,
    shutdown: CancellationToken,
}

fn to_sse(ev: &SessionEvent) -> Event {
    let kind = ev
        .body
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("event")
        .to_owned();
    let data = serde_json::to_string(ev).unwrap_or_else(|_| "{}".into());
    Event::default()
        .id(ev.seq.to_string())
        .event(kind)
        .data(data)
}

fn event_stream(follow: Follow) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(follow, |mut st| async move {
        loop {
            if let Some(ev) = st.buf.pop_front() {
                return Some((Ok(to_sse(&ev)), st));
            }
            match store::events::list(&st.pool, st.session, st.cursor, st.turn, PAGE).await {
                Ok(rows) if !rows.is_empty() => {
                    if let Some(last) = rows.last() {
                        st.cursor = last.seq;
                    }
                    st.buf.extend(rows);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, session.id = %st.session, "event stream: read failed; retrying")
                }
            }
            tokio::select! {
                () = st.shutdown.cancelled() => return None,
                alive = st.sub.changed() => if !alive { return None },
                () = tokio::time::sleep(SAFETY_POLL) => {}
            }
        }
    })
}
