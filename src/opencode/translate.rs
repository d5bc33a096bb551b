//! hotplex events → OpenCode events and messages. A [`Transcript`] folds a session's stored
//! events in seq order; each event yields the OpenCode events a client of `opencode serve`
//! would see at that point (docs/opencode.md §5.3), and the fold's state is the message
//! list (`GET /session/{id}/message`). Everything is derived from the stored events, so
//! every API node translates the same rows into the same ids and shapes.
//!
//! Mapping: a turn is a user message plus one assistant message per model step (a step
//! ends when the agent's message is complete and the next one begins); text and thinking
//! deltas become text/reasoning parts streamed with `message.part.delta`; tool calls are
//! tool parts going pending → running → completed/error; the turn's usage goes on its last
//! step; failures and interrupts become `session.error` plus an assistant `error`.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::ids::{self, Kind};
use super::view;
use crate::domain::{SessionId, SessionStatus, TurnId};
use crate::events::{EventBody, SessionEvent, Usage};

/// What a translation needs to know about the session.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub session: SessionId,
    pub oc_id: String,
    pub directory: String,
    pub provider: String,
    pub model: String,
    /// OpenCode's `Session` (sent with `session.created`/`updated`/`deleted`).
    pub info: Value,
}

impl Ctx {
    /// What a translation of `row`'s events needs.
    pub fn of(row: &crate::store::sessions::SessionRow, default_dir: &str) -> Self {
        let (provider, model) = view::model_of(row);
        Self {
            session: row.session_id,
            oc_id: row.oc_id.clone(),
            directory: view::directory_of(row, default_dir),
            provider: provider.to_owned(),
            model,
            info: view::session(row, default_dir),
        }
    }
}

/// One OpenCode event: `{"id","type","properties"}` on `/event`.
#[derive(Debug, Clone, PartialEq)]
pub struct OcEvent {
    pub id: String,
    pub kind: &'static str,
    pub properties: Value,
}

impl OcEvent {
    /// The `/event` envelope.
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": self.kind, "properties": self.properties})
    }
}

/// A message with its parts, as `GET /session/{id}/message` returns it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    pub info: Value,
    pub parts: Vec<Value>,
}

impl Message {
    pub fn to_json(&self) -> Value {
        json!({"info": self.info, "parts": self.parts})
    }

    pub fn id(&self) -> &str {
        self.info.get("id").and_then(Value::as_str).unwrap_or("")
    }
}

#[derive(Debug, Default)]
struct TurnState {
    user: Option<Message>,
    agent: String,
    steps: Vec<Message>,
    /// The agent reported the current step's message complete: the next content opens a
    /// new step.
    step_done: bool,
    step_had_tools: bool,
    text: Option<usize>,
    reasoning: Option<usize>,
    /// Tool call id → (step, part).
    tools: HashMap<String, (usize, usize)>,
    ended: bool,
}

/// The fold of a session's events.
#[derive(Debug)]
pub struct Transcript {
    ctx: Ctx,
    /// Keep finished turns (for message lists); a live stream drops them.
    keep: bool,
    order: Vec<TurnId>,
    turns: HashMap<TurnId, TurnState>,
}

/// Emits the OpenCode events of one hotplex event, with ids derived from it.
struct Out<'a> {
    session: SessionId,
    ev: &'a SessionEvent,
    objects: u32,
    events: u32,
    out: Vec<OcEvent>,
}

impl Out<'_> {
    fn id(&mut self, kind: Kind) -> String {
        let n = self.objects;
        self.objects += 1;
        ids::derive(kind, self.session, self.ev.seq, n, self.ev.created_at)
    }

    fn emit(&mut self, kind: &'static str, properties: Value) {
        let id = ids::derive(
            Kind::Event,
            self.session,
            self.ev.seq,
            256 + self.events,
            self.ev.created_at,
        );
        self.events += 1;
        self.out.push(OcEvent {
            id,
            kind,
            properties,
        });
    }

    fn ms(&self) -> i64 {
        view::ms(self.ev.created_at)
    }
}

fn zero_usage() -> Usage {
    Usage::default()
}

impl Transcript {
    /// A transcript for a live stream (finished turns are dropped) or, with `keep`, for
    /// listing messages.
    pub fn new(ctx: Ctx, keep: bool) -> Self {
        Self {
            ctx,
            keep,
            order: Vec::new(),
            turns: HashMap::new(),
        }
    }

    /// Refreshes what is known of the session (after it was updated).
    pub fn set_ctx(&mut self, ctx: Ctx) {
        self.ctx = ctx;
    }

    /// Every message so far, in order.
    pub fn messages(&self) -> Vec<&Message> {
        self.order
            .iter()
            .filter_map(|t| self.turns.get(t))
            .flat_map(|t| t.user.iter().chain(t.steps.iter()))
            .collect()
    }

    /// The last assistant message of a turn (what the blocking prompt call returns).
    pub fn last_assistant(&self, turn: TurnId) -> Option<&Message> {
        self.turns.get(&turn).and_then(|t| t.steps.last())
    }

    /// The user message of a turn.
    pub fn user_message(&self, turn: TurnId) -> Option<&Message> {
        self.turns.get(&turn).and_then(|t| t.user.as_ref())
    }

    /// Folds one event; returns the OpenCode events it produces.
    pub fn apply(&mut self, ev: &SessionEvent) -> Vec<OcEvent> {
        let Ok(body) = serde_json::from_value::<EventBody>(ev.body.clone()) else {
            return Vec::new();
        };
        let mut out = Out {
            session: self.ctx.session,
            ev,
            objects: 0,
            events: 0,
            out: Vec::new(),
        };
        let sid = self.ctx.oc_id.clone();
        match body {
            EventBody::SessionCreated {} => out.emit(
                "session.created",
                json!({"sessionID": sid, "info": self.ctx.info}),
            ),
            EventBody::SessionUpdated {} => out.emit(
                "session.updated",
                json!({"sessionID": sid, "info": self.ctx.info}),
            ),
            EventBody::SessionDeleted {} => out.emit(
                "session.deleted",
                json!({"sessionID": sid, "info": self.ctx.info}),
            ),
            EventBody::SessionStatus { status } => match status {
                SessionStatus::Idle => {
                    out.emit(
                        "session.status",
                        json!({"sessionID": sid, "status": {"type": "idle"}}),
                    );
                    out.emit("session.idle", json!({"sessionID": sid}));
                }
                _ => out.emit(
                    "session.status",
                    json!({"sessionID": sid, "status": {"type": "busy"}}),
                ),
            },
            body => {
                if let Some(turn) = ev.turn_id {
                    self.apply_turn(turn, body, &mut out);
                }
            }
        }
        out.out
    }

    fn apply_turn(&mut self, turn: TurnId, body: EventBody, out: &mut Out<'_>) {
        if !self.turns.contains_key(&turn) {
            self.order.push(turn);
        }
        let ctx = &self.ctx;
        let st = self.turns.entry(turn).or_insert_with(|| TurnState {
            agent: "build".into(),
            ..TurnState::default()
        });
        match body {
            EventBody::TurnQueued {
                prompt,
                message_id,
                agent,
                ..
            } => {
                let id = message_id.unwrap_or_else(|| out.id(Kind::Message));
                st.agent = agent.unwrap_or_else(|| "build".into());
                let info = json!({
                    "id": id, "sessionID": ctx.oc_id, "role": "user",
                    "time": {"created": out.ms()}, "agent": st.agent,
                    "model": {"providerID": ctx.provider, "modelID": ctx.model},
                });
                let part = json!({
                    "id": out.id(Kind::Part), "sessionID": ctx.oc_id, "messageID": id,
                    "type": "text", "text": prompt,
                });
                out.emit(
                    "message.updated",
                    json!({"sessionID": ctx.oc_id, "info": info}),
                );
                out.emit(
                    "message.part.updated",
                    json!({"sessionID": ctx.oc_id, "part": part, "time": out.ms()}),
                );
                st.user = Some(Message {
                    info,
                    parts: vec![part],
                });
            }
            EventBody::TurnStarted { .. } => {
                if st.steps.is_empty() {
                    open_step(ctx, st, out);
                }
            }
            EventBody::TextDelta { text } => {
                ensure_step(ctx, st, out);
                let idx = match st.text {
                    Some(i) => i,
                    None => open_part(ctx, st, out, "text"),
                };
                append(ctx, st, out, idx, &text);
            }
            EventBody::ThinkingDelta { text } => {
                ensure_step(ctx, st, out);
                let idx = match st.reasoning {
                    Some(i) => i,
                    None => {
                        let i = open_part(ctx, st, out, "reasoning");
                        st.reasoning = Some(i);
                        i
                    }
                };
                append(ctx, st, out, idx, &text);
            }
            EventBody::ToolStarted {
                tool_use_id,
                name,
                input,
            } => {
                ensure_step(ctx, st, out);
                close_parts(ctx, st, out, None);
                let step = st.steps.len() - 1;
                let msg_id = st.steps[step].id().to_owned();
                let mut part = json!({
                    "id": out.id(Kind::Part), "sessionID": ctx.oc_id, "messageID": msg_id,
                    "type": "tool", "callID": tool_use_id, "tool": name.to_lowercase(),
                    "state": {"status": "pending", "input": {}, "raw": ""},
                });
                out.emit(
                    "message.part.updated",
                    json!({"sessionID": ctx.oc_id, "part": part, "time": out.ms()}),
                );
                part["state"] = json!({
                    "status": "running", "input": input, "title": name,
                    "time": {"start": out.ms()},
                });
                out.emit(
                    "message.part.updated",
                    json!({"sessionID": ctx.oc_id, "part": part, "time": out.ms()}),
                );
                let parts = &mut st.steps[step].parts;
                parts.push(part);
                st.tools.insert(tool_use_id, (step, parts.len() - 1));
                st.step_had_tools = true;
            }
            EventBody::ToolCompleted {
                tool_use_id,
                output,
                is_error,
            } => {
                let Some(&(step, idx)) = st.tools.get(&tool_use_id) else {
                    return;
                };
                let Some(part) = st.steps.get_mut(step).and_then(|m| m.parts.get_mut(idx)) else {
                    return;
                };
                let input = part["state"]["input"].clone();
                let title = part["state"]["title"].clone();
                let start = part["state"]["time"]["start"].clone();
                part["state"] = if is_error {
                    json!({"status": "error", "input": input, "error": output,
                           "time": {"start": start, "end": out.ms()}})
                } else {
                    json!({"status": "completed", "input": input, "output": output, "title": title,
                           "metadata": {"output": output, "truncated": false},
                           "time": {"start": start, "end": out.ms()}})
                };
                let part = part.clone();
                out.emit(
                    "message.part.updated",
                    json!({"sessionID": ctx.oc_id, "part": part, "time": out.ms()}),
                );
            }
            EventBody::MessageCompleted { text, .. } => {
                if st.steps.is_empty() || st.step_done {
                    if text.is_empty() {
                        return;
                    }
                    ensure_step(ctx, st, out);
                }
                if st.text.is_none() && !text.is_empty() {
                    // Nothing was streamed: the whole text arrives as one delta.
                    let idx = open_part(ctx, st, out, "text");
                    append(ctx, st, out, idx, &text);
                }
                close_parts(ctx, st, out, Some(&text));
                st.step_done = true;
            }
            EventBody::TurnCompleted { result, usage } => {
                if st.steps.is_empty() {
                    open_step(ctx, st, out);
                }
                let has_text = st
                    .steps
                    .iter()
                    .flat_map(|m| m.parts.iter())
                    .any(|p| p["type"] == "text");
                if !has_text && !result.is_empty() {
                    let idx = open_part(ctx, st, out, "text");
                    append(ctx, st, out, idx, &result);
                }
                close_parts(ctx, st, out, None);
                finish_step(ctx, st, out, "stop", &usage, None);
                st.ended = true;
            }
            EventBody::TurnFailed { error } => {
                let err = json!({"name": "UnknownError", "data": {"message": error}});
                fail(ctx, st, out, err);
            }
            EventBody::TurnInterrupted { .. } => {
                let err = json!({"name": "MessageAbortedError", "data": {"message": "Aborted"}});
                fail(ctx, st, out, err);
            }
            // A blocked prompt made no turn; its client got the refusal as the answer.
            EventBody::ContextLost { .. }
            | EventBody::SecurityBlocked { .. }
            | EventBody::TurnRetried { .. }
            | EventBody::AgentRaw { .. }
            | EventBody::SessionStatus { .. }
            | EventBody::SessionCreated {}
            | EventBody::SessionUpdated {}
            | EventBody::SessionDeleted {} => {}
        }
        if st.ended && !self.keep {
            self.turns.remove(&turn);
            self.order.retain(|t| *t != turn);
        }
    }
}

/// Starts a new assistant message (one model step) with its step-start part.
fn open_step(ctx: &Ctx, st: &mut TurnState, out: &mut Out<'_>) {
    let id = out.id(Kind::Message);
    let parent = st
        .user
        .as_ref()
        .map(|u| u.id().to_owned())
        .unwrap_or_default();
    let info = json!({
        "id": id, "sessionID": ctx.oc_id, "role": "assistant", "parentID": parent,
        "modelID": ctx.model, "providerID": ctx.provider, "mode": st.agent, "agent": st.agent,
        "path": {"cwd": ctx.directory, "root": ctx.directory},
        "cost": 0, "tokens": view::tokens(&zero_usage()), "time": {"created": out.ms()},
    });
    out.emit(
        "message.updated",
        json!({"sessionID": ctx.oc_id, "info": info}),
    );
    let part = json!({
        "id": out.id(Kind::Part), "sessionID": ctx.oc_id, "messageID": id, "type": "step-start",
    });
    out.emit(
        "message.part.updated",
        json!({"sessionID": ctx.oc_id, "part": part, "time": out.ms()}),
    );
    st.steps.push(Message {
        info,
        parts: vec![part],
    });
    st.step_done = false;
    st.step_had_tools = false;
    st.text = None;
    st.reasoning = None;
}

/// Makes sure content has a step to go into: the first one, or the next one when the
/// agent finished the previous message.
fn ensure_step(ctx: &Ctx, st: &mut TurnState, out: &mut Out<'_>) {
    if st.steps.is_empty() {
        open_step(ctx, st, out);
    } else if st.step_done {
        close_parts(ctx, st, out, None);
        let reason = if st.step_had_tools {
            "tool-calls"
        } else {
            "stop"
        };
        finish_step(ctx, st, out, reason, &zero_usage(), None);
        open_step(ctx, st, out);
    }
}

/// Opens an empty text or reasoning part in the current step; returns its index.
fn open_part(ctx: &Ctx, st: &mut TurnState, out: &mut Out<'_>, kind: &str) -> usize {
    let Some(step) = st.steps.last_mut() else {
        return 0;
    };
    let part = json!({
        "id": out.id(Kind::Part), "sessionID": ctx.oc_id, "messageID": step.id(),
        "type": kind, "text": "", "time": {"start": out.ms()},
    });
    out.emit(
        "message.part.updated",
        json!({"sessionID": ctx.oc_id, "part": part, "time": out.ms()}),
    );
    step.parts.push(part);
    let idx = step.parts.len() - 1;
    if kind == "text" {
        st.text = Some(idx);
    }
    idx
}

fn append(ctx: &Ctx, st: &mut TurnState, out: &mut Out<'_>, idx: usize, delta: &str) {
    let Some(step) = st.steps.last_mut() else {
        return;
    };
    let msg_id = step.id().to_owned();
    let Some(part) = step.parts.get_mut(idx) else {
        return;
    };
    let text = format!("{}{delta}", part["text"].as_str().unwrap_or(""));
    part["text"] = Value::String(text);
    let part_id = part["id"].clone();
    out.emit(
        "message.part.delta",
        json!({"sessionID": ctx.oc_id, "messageID": msg_id, "partID": part_id,
               "field": "text", "delta": delta}),
    );
}

/// Ends the open text and reasoning parts (`time.end`, full text). `final_text`, when the
/// agent reported its message's whole text, is authoritative for the text part.
fn close_parts(ctx: &Ctx, st: &mut TurnState, out: &mut Out<'_>, final_text: Option<&str>) {
    let Some(step) = st.steps.last_mut() else {
        return;
    };
    for (slot, is_text) in [(st.reasoning.take(), false), (st.text.take(), true)] {
        let Some(part) = slot.and_then(|i| step.parts.get_mut(i)) else {
            continue;
        };
        if is_text && let Some(t) = final_text.filter(|t| !t.is_empty()) {
            part["text"] = Value::String(t.to_owned());
        }
        part["time"]["end"] = json!(out.ms());
        let part = part.clone();
        out.emit(
            "message.part.updated",
            json!({"sessionID": ctx.oc_id, "part": part, "time": out.ms()}),
        );
    }
}

/// Ends the current step: its step-finish part, then the assistant message with `finish`
/// (or `error`), tokens, cost and `time.completed`.
fn finish_step(
    ctx: &Ctx,
    st: &mut TurnState,
    out: &mut Out<'_>,
    reason: &str,
    usage: &Usage,
    error: Option<Value>,
) {
    let Some(step) = st.steps.last_mut() else {
        return;
    };
    let tokens = view::tokens(usage);
    if error.is_none() {
        let part = json!({
            "id": out.id(Kind::Part), "sessionID": ctx.oc_id, "messageID": step.id(),
            "type": "step-finish", "reason": reason, "cost": usage.cost_usd, "tokens": tokens,
        });
        out.emit(
            "message.part.updated",
            json!({"sessionID": ctx.oc_id, "part": part, "time": out.ms()}),
        );
        step.parts.push(part);
        step.info["finish"] = json!(reason);
    }
    step.info["tokens"] = tokens;
    step.info["cost"] = json!(usage.cost_usd);
    if let Some(e) = error {
        step.info["error"] = e;
    }
    step.info["time"]["completed"] = json!(out.ms());
    let info = step.info.clone();
    out.emit(
        "message.updated",
        json!({"sessionID": ctx.oc_id, "info": info}),
    );
    st.step_done = true;
}

fn fail(ctx: &Ctx, st: &mut TurnState, out: &mut Out<'_>, error: Value) {
    out.emit(
        "session.error",
        json!({"sessionID": ctx.oc_id, "error": error}),
    );
    if st.steps.is_empty() {
        open_step(ctx, st, out);
    }
    close_parts(ctx, st, out, None);
    finish_step(ctx, st, out, "error", &zero_usage(), Some(error));
    st.ended = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn ctx() -> Ctx {
        Ctx {
            session: SessionId::new_random(),
            oc_id: "ses_x".into(),
            directory: "/w".into(),
            provider: "claude-code".into(),
            model: "default".into(),
            info: json!({"id": "ses_x"}),
        }
    }

    fn ev(seq: i64, turn: Option<TurnId>, body: EventBody) -> SessionEvent {
        SessionEvent {
            seq,
            turn_id: turn,
            created_at: Utc::now(),
            body: serde_json::to_value(body).unwrap(),
        }
    }

    fn kinds(out: &[OcEvent]) -> Vec<&'static str> {
        out.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_text_turn_becomes_opencodes_sequence_and_messages() {
        let t = TurnId::new_random();
        let mut tr = Transcript::new(ctx(), true);
        let mut all = Vec::new();
        for (seq, turn, body) in [
            (
                1,
                None,
                EventBody::SessionStatus {
                    status: SessionStatus::Busy,
                },
            ),
            (
                2,
                Some(t),
                EventBody::TurnQueued {
                    turn_seq: 1,
                    prompt: "hi".into(),
                    message_id: Some("msg_client".into()),
                    agent: None,
                },
            ),
            (
                3,
                Some(t),
                EventBody::TurnStarted {
                    worker_id: crate::domain::WorkerId::new_random(),
                    pid: None,
                    resumed: false,
                },
            ),
            (4, Some(t), EventBody::TextDelta { text: "Hel".into() }),
            (5, Some(t), EventBody::TextDelta { text: "lo".into() }),
            (
                6,
                Some(t),
                EventBody::MessageCompleted {
                    message_id: "m".into(),
                    text: "Hello".into(),
                },
            ),
            (
                7,
                Some(t),
                EventBody::TurnCompleted {
                    result: "Hello".into(),
                    usage: Usage {
                        input_tokens: 3,
                        output_tokens: 2,
                        cost_usd: 0.5,
                        ..Usage::default()
                    },
                },
            ),
            (
                8,
                None,
                EventBody::SessionStatus {
                    status: SessionStatus::Idle,
                },
            ),
        ] {
            all.extend(tr.apply(&ev(seq, turn, body)));
        }
        assert_eq!(
            kinds(&all),
            [
                "session.status",
                "message.updated",
                "message.part.updated",
                "message.updated",
                "message.part.updated",
                "message.part.updated",
                "message.part.delta",
                "message.part.delta",
                "message.part.updated",
                "message.part.updated",
                "message.updated",
                "session.status",
                "session.idle",
            ]
        );
        let msgs = tr.messages();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].id(), "msg_client");
        let a = tr.last_assistant(t).unwrap();
        assert_eq!(a.info["parentID"], "msg_client");
        assert_eq!(a.info["finish"], "stop");
        assert_eq!(a.info["tokens"]["input"], 3);
        assert!(a.info["time"]["completed"].is_i64());
        let types: Vec<_> = a
            .parts
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["step-start", "text", "step-finish"]);
        assert_eq!(a.parts[1]["text"], "Hello");
        // The same events give the same ids (every API node agrees).
        let mut again = Transcript::new(tr.ctx.clone(), true);
        let e = ev(
            3,
            Some(t),
            EventBody::TurnStarted {
                worker_id: crate::domain::WorkerId::new_random(),
                pid: None,
                resumed: false,
            },
        );
        let x = again.apply(&e);
        assert_eq!(x, again_fresh(&tr.ctx, &e));
    }

    fn again_fresh(ctx: &Ctx, e: &SessionEvent) -> Vec<OcEvent> {
        Transcript::new(ctx.clone(), true).apply(e)
    }

    #[test]
    fn tools_open_a_new_step_and_interrupts_become_aborted_errors() {
        let t = TurnId::new_random();
        let mut tr = Transcript::new(ctx(), false);
        let mut all = Vec::new();
        for (seq, body) in [
            (
                1,
                EventBody::TurnStarted {
                    worker_id: crate::domain::WorkerId::new_random(),
                    pid: None,
                    resumed: false,
                },
            ),
            (
                2,
                EventBody::ToolStarted {
                    tool_use_id: "c1".into(),
                    name: "Bash".into(),
                    input: json!({"command": "ls"}),
                },
            ),
            (
                3,
                EventBody::MessageCompleted {
                    message_id: "m1".into(),
                    text: String::new(),
                },
            ),
            (
                4,
                EventBody::ToolCompleted {
                    tool_use_id: "c1".into(),
                    output: "a b".into(),
                    is_error: false,
                },
            ),
            (
                5,
                EventBody::TextDelta {
                    text: "done".into(),
                },
            ),
            (
                6,
                EventBody::TurnInterrupted {
                    partial_text: "done".into(),
                },
            ),
        ] {
            all.extend(tr.apply(&ev(seq, Some(t), body)));
        }
        let tool_states: Vec<_> = all
            .iter()
            .filter(|e| e.properties["part"]["type"] == "tool")
            .map(|e| {
                e.properties["part"]["state"]["status"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(tool_states, ["pending", "running", "completed"]);
        let finishes: Vec<_> = all
            .iter()
            .filter(|e| e.properties["part"]["type"] == "step-finish")
            .map(|e| e.properties["part"]["reason"].clone())
            .collect();
        assert_eq!(finishes, [json!("tool-calls")]);
        let err = all.iter().find(|e| e.kind == "session.error").unwrap();
        assert_eq!(err.properties["error"]["name"], "MessageAbortedError");
        let last = all.last().unwrap();
        assert_eq!(last.kind, "message.updated");
        assert_eq!(
            last.properties["info"]["error"]["name"],
            "MessageAbortedError"
        );
        // A live transcript forgets finished turns.
        assert!(tr.messages().is_empty());
    }
}
