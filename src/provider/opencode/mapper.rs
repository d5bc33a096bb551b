//! OpenCode server events → [`AgentEvent`]s for one turn of one session. A turn is what
//! follows our `prompt_async` with our own user message id: only assistant messages whose
//! `parentID` is that id count (OpenCode sends more events for a session after `idle`, and a
//! second idle after an abort), and `session.idle` ends the turn only after the session was
//! seen busy.
//!
//! OpenCode publishes a message's events from concurrent code, so their order varies under
//! load: a part's first deltas can come before the `message.updated` that says whose the
//! message is (they wait here until it does), and a part's final text can come after the
//! message reported completion (the turn's result is therefore taken at `idle`, not at
//! completion).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde_json::Value;

use crate::events::Usage;
use crate::provider::{AgentEvent, TurnEnd, TurnOutcome};

/// The state of the running turn.
#[derive(Debug)]
pub struct TurnMapper {
    user_message: String,
    started: Instant,
    busy_seen: bool,
    aborted: bool,
    assistants: HashSet<String>,
    completed: HashSet<String>,
    /// Part id → part type, for routing deltas (text vs reasoning).
    part_kinds: HashMap<String, String>,
    /// Assistant message id → its text so far.
    texts: HashMap<String, String>,
    /// Our assistant messages in the order they completed (the result is the last one's
    /// text).
    completion_order: Vec<String>,
    /// Deltas of messages not known yet (whose parent is unknown), by message id, with
    /// their part ids; bounded by [`PENDING_LIMIT`] bytes.
    pending: HashMap<String, Vec<(String, String)>>,
    pending_bytes: usize,
    tools_started: HashSet<String>,
    usage: Usage,
    error: Option<(String, String)>,
    ended: bool,
}

/// Delta text kept for messages not known yet; beyond this it is dropped (the part's final
/// text still makes the result whole).
const PENDING_LIMIT: usize = 1 << 20;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

impl TurnMapper {
    pub fn new(user_message: String) -> Self {
        Self {
            user_message,
            started: Instant::now(),
            busy_seen: false,
            aborted: false,
            assistants: HashSet::new(),
            completed: HashSet::new(),
            part_kinds: HashMap::new(),
            texts: HashMap::new(),
            completion_order: Vec::new(),
            pending: HashMap::new(),
            pending_bytes: 0,
            tools_started: HashSet::new(),
            usage: Usage::default(),
            error: None,
            ended: false,
        }
    }

    /// We asked OpenCode to abort: the turn ends interrupted.
    pub fn aborting(&mut self) {
        self.aborted = true;
    }

    /// Our user message of the turn.
    pub fn user_message(&self) -> &str {
        &self.user_message
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Maps one event (the `/event` shape: `{type, properties}`) of this session.
    pub fn map(&mut self, ev: &Value) -> Vec<AgentEvent> {
        if self.ended {
            return Vec::new();
        }
        let p = &ev["properties"];
        match s(&ev["type"]) {
            "session.status" => {
                match s(&p["status"]["type"]) {
                    "busy" => self.busy_seen = true,
                    "retry" => return vec![AgentEvent::Raw(ev.clone())],
                    _ => {}
                }
                Vec::new()
            }
            "message.updated" => self.message_updated(&p["info"]),
            "message.part.updated" => self.part_updated(&p["part"]),
            "message.part.delta" => {
                let msg = s(&p["messageID"]);
                if s(&p["field"]) != "text" {
                    return Vec::new();
                }
                let (part, delta) = (s(&p["partID"]).to_owned(), s(&p["delta"]).to_owned());
                if !self.assistants.contains(msg) {
                    // Perhaps ours, announced later: keep it until we know.
                    if self.pending_bytes + delta.len() <= PENDING_LIMIT {
                        self.pending_bytes += delta.len();
                        self.pending
                            .entry(msg.to_owned())
                            .or_default()
                            .push((part, delta));
                    }
                    return Vec::new();
                }
                vec![self.delta(msg, &part, delta)]
            }
            "session.error" if self.busy_seen || self.aborted => {
                let name = s(&p["error"]["name"]).to_owned();
                let message = p["error"]["data"]["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| name.clone());
                self.error.get_or_insert((name, message));
                Vec::new()
            }
            "session.idle" if self.busy_seen || (self.aborted && self.error.is_some()) => {
                self.ended = true;
                let outcome = match &self.error {
                    _ if self.aborted => TurnOutcome::Interrupted,
                    Some((name, _)) if name == "MessageAbortedError" => TurnOutcome::Interrupted,
                    Some((_, message)) => TurnOutcome::Failed {
                        error: message.clone(),
                    },
                    None => TurnOutcome::Completed {
                        result: self.result(),
                    },
                };
                self.usage.duration_ms = self.started.elapsed().as_millis() as i64;
                vec![AgentEvent::TurnEnded(TurnEnd {
                    outcome,
                    usage: self.usage.clone(),
                })]
            }
            _ => Vec::new(),
        }
    }

    /// The deltas held for a message, no longer counted against the bound.
    fn take_pending(&mut self, msg: &str) -> Vec<(String, String)> {
        let held = self.pending.remove(msg).unwrap_or_default();
        self.pending_bytes -= held.iter().map(|(_, d)| d.len()).sum::<usize>();
        held
    }

    /// A text (or reasoning) delta of one of our messages.
    fn delta(&mut self, msg: &str, part: &str, delta: String) -> AgentEvent {
        match self.part_kinds.get(part).map(String::as_str) {
            Some("reasoning") => AgentEvent::ThinkingDelta(delta),
            _ => {
                self.texts
                    .entry(msg.to_owned())
                    .or_default()
                    .push_str(&delta);
                AgentEvent::TextDelta(delta)
            }
        }
    }

    fn message_updated(&mut self, info: &Value) -> Vec<AgentEvent> {
        let id = s(&info["id"]).to_owned();
        if s(&info["role"]) != "assistant" || s(&info["parentID"]) != self.user_message {
            // Not ours: its held deltas can go.
            self.take_pending(&id);
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.assistants.insert(id.clone()) {
            for (part, delta) in self.take_pending(&id) {
                out.push(self.delta(&id, &part, delta));
            }
        }
        if info["time"]["completed"].is_null() || !self.completed.insert(id.clone()) {
            return out;
        }
        self.completion_order.push(id.clone());
        let t = &info["tokens"];
        let n = |v: &Value| v.as_i64().unwrap_or(0);
        self.usage.input_tokens += n(&t["input"]);
        self.usage.output_tokens += n(&t["output"]);
        self.usage.cache_read_tokens += n(&t["cache"]["read"]);
        self.usage.cache_write_tokens += n(&t["cache"]["write"]);
        self.usage.cost_usd += info["cost"].as_f64().unwrap_or(0.0);
        if let Some(m) = info["modelID"].as_str() {
            let provider = s(&info["providerID"]);
            self.usage.model = Some(if provider.is_empty() {
                m.to_owned()
            } else {
                format!("{provider}/{m}")
            });
        }
        if let Some(name) = info["error"]["name"].as_str() {
            let message = s(&info["error"]["data"]["message"]);
            self.error
                .get_or_insert((name.to_owned(), message.to_owned()));
        }
        let text = self.texts.get(&id).cloned().unwrap_or_default();
        out.push(AgentEvent::MessageCompleted { id, text });
        out
    }

    /// The turn's answer: the text of the last completed message that has one (a step that
    /// only called tools has none), read at the end of the turn.
    fn result(&self) -> String {
        self.completion_order
            .iter()
            .rev()
            .find_map(|id| self.texts.get(id).filter(|t| !t.is_empty()))
            .cloned()
            .unwrap_or_default()
    }

    fn part_updated(&mut self, part: &Value) -> Vec<AgentEvent> {
        let msg = s(&part["messageID"]);
        let kind = s(&part["type"]).to_owned();
        // The kind is needed to route deltas that are held until the message is known.
        self.part_kinds
            .insert(s(&part["id"]).to_owned(), kind.clone());
        if !self.assistants.contains(msg) {
            return Vec::new();
        }
        match kind.as_str() {
            // The final text of a part is authoritative (deltas may have been missed).
            "text" if !part["time"]["end"].is_null() => {
                self.texts
                    .insert(msg.to_owned(), s(&part["text"]).to_owned());
                Vec::new()
            }
            "tool" => {
                let state = &part["state"];
                let call = s(&part["callID"]).to_owned();
                let mut out = Vec::new();
                let status = s(&state["status"]);
                if matches!(status, "running" | "completed" | "error")
                    && self.tools_started.insert(call.clone())
                {
                    out.push(AgentEvent::ToolStarted {
                        id: call.clone(),
                        name: s(&part["tool"]).to_owned(),
                        input: state["input"].clone(),
                    });
                }
                match status {
                    "completed" => out.push(AgentEvent::ToolCompleted {
                        id: call,
                        output: s(&state["output"]).to_owned(),
                        is_error: false,
                    }),
                    "error" => out.push(AgentEvent::ToolCompleted {
                        id: call,
                        output: s(&state["error"]).to_owned(),
                        is_error: true,
                    }),
                    _ => {}
                }
                out
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(kind: &str, properties: Value) -> Value {
        json!({"type": kind, "properties": properties})
    }

    #[test]
    fn a_turn_with_a_tool_maps_to_agent_events_and_ends_on_idle_after_busy() {
        let mut m = TurnMapper::new("msg_u".into());
        let a = json!({"id": "msg_a", "role": "assistant", "parentID": "msg_u", "time": {"created": 1}});
        let mut out = Vec::new();
        for e in [
            // An idle from before our prompt does not end the turn.
            ev("session.idle", json!({"sessionID": "s"})),
            ev("session.status", json!({"status": {"type": "busy"}})),
            // Another message's parts are not ours.
            ev(
                "message.part.delta",
                json!({"messageID": "msg_other", "partID": "p0", "field": "text", "delta": "x"}),
            ),
            ev("message.updated", json!({"info": a})),
            ev(
                "message.part.updated",
                json!({"part": {"id": "p1", "messageID": "msg_a", "type": "text", "text": ""}}),
            ),
            ev(
                "message.part.delta",
                json!({"messageID": "msg_a", "partID": "p1", "field": "text", "delta": "Hel"}),
            ),
            ev(
                "message.part.delta",
                json!({"messageID": "msg_a", "partID": "p1", "field": "text", "delta": "lo"}),
            ),
            ev(
                "message.part.updated",
                json!({"part": {"id": "p2", "messageID": "msg_a", "type": "tool", "callID": "c1", "tool": "bash", "state": {"status": "pending", "input": {}}}}),
            ),
            ev(
                "message.part.updated",
                json!({"part": {"id": "p2", "messageID": "msg_a", "type": "tool", "callID": "c1", "tool": "bash", "state": {"status": "running", "input": {"command": "ls"}}}}),
            ),
            ev(
                "message.part.updated",
                json!({"part": {"id": "p2", "messageID": "msg_a", "type": "tool", "callID": "c1", "tool": "bash", "state": {"status": "completed", "input": {"command": "ls"}, "output": "a\n"}}}),
            ),
            ev(
                "message.updated",
                json!({"info": {"id": "msg_a", "role": "assistant", "parentID": "msg_u", "modelID": "m", "providerID": "p", "cost": 0.25, "tokens": {"input": 10, "output": 3, "cache": {"read": 1, "write": 0}}, "time": {"created": 1, "completed": 2}}}),
            ),
            ev("session.status", json!({"status": {"type": "idle"}})),
            ev("session.idle", json!({})),
        ] {
            out.extend(m.map(&e));
        }
        assert_eq!(out[0], AgentEvent::TextDelta("Hel".into()));
        assert_eq!(out[1], AgentEvent::TextDelta("lo".into()));
        assert!(
            matches!(&out[2], AgentEvent::ToolStarted { id, name, input } if id == "c1" && name == "bash" && input["command"] == "ls")
        );
        assert!(
            matches!(&out[3], AgentEvent::ToolCompleted { output, is_error: false, .. } if output == "a\n")
        );
        assert_eq!(
            out[4],
            AgentEvent::MessageCompleted {
                id: "msg_a".into(),
                text: "Hello".into()
            }
        );
        let AgentEvent::TurnEnded(end) = &out[5] else {
            panic!("{out:?}")
        };
        assert_eq!(
            end.outcome,
            TurnOutcome::Completed {
                result: "Hello".into()
            }
        );
        assert_eq!(
            (
                end.usage.input_tokens,
                end.usage.output_tokens,
                end.usage.cache_read_tokens
            ),
            (10, 3, 1)
        );
        assert_eq!(end.usage.model.as_deref(), Some("p/m"));
        assert!(m.is_ended());
        assert!(m.map(&ev("session.idle", json!({}))).is_empty());
    }

    #[test]
    fn an_abort_ends_interrupted_and_errors_end_failed() {
        let mut m = TurnMapper::new("msg_u".into());
        m.map(&ev("session.status", json!({"status": {"type": "busy"}})));
        m.aborting();
        m.map(&ev(
            "session.error",
            json!({"error": {"name": "MessageAbortedError", "data": {"message": "Aborted"}}}),
        ));
        let out = m.map(&ev("session.idle", json!({})));
        assert!(
            matches!(&out[0], AgentEvent::TurnEnded(e) if e.outcome == TurnOutcome::Interrupted)
        );

        let mut m = TurnMapper::new("msg_u".into());
        m.map(&ev("session.status", json!({"status": {"type": "busy"}})));
        m.map(&ev(
            "session.error",
            json!({"error": {"name": "UnknownError", "data": {"message": "Model not found: x/y"}}}),
        ));
        let out = m.map(&ev("session.idle", json!({})));
        assert!(
            matches!(&out[0], AgentEvent::TurnEnded(e) if e.outcome == TurnOutcome::Failed { error: "Model not found: x/y".into() })
        );
    }

    #[test]
    fn events_out_of_order_under_load_still_give_the_whole_stream_and_result() {
        let mut m = TurnMapper::new("msg_u".into());
        let mut out = Vec::new();
        let info = |completed: bool| {
            let mut i = json!({"id": "msg_a", "role": "assistant", "parentID": "msg_u", "time": {"created": 1}});
            if completed {
                i["time"]["completed"] = json!(2);
            }
            i
        };
        for e in [
            ev("session.status", json!({"status": {"type": "busy"}})),
            // Deltas before the message is announced, and another session's message.
            ev(
                "message.part.updated",
                json!({"part": {"id": "p1", "messageID": "msg_a", "type": "text", "text": ""}}),
            ),
            ev(
                "message.part.delta",
                json!({"messageID": "msg_a", "partID": "p1", "field": "text", "delta": "Hel"}),
            ),
            ev(
                "message.part.delta",
                json!({"messageID": "msg_x", "partID": "px", "field": "text", "delta": "nope"}),
            ),
            ev("message.updated", json!({"info": info(false)})),
            ev(
                "message.updated",
                json!({"info": {"id": "msg_x", "role": "assistant", "parentID": "msg_other"}}),
            ),
            ev(
                "message.part.delta",
                json!({"messageID": "msg_a", "partID": "p1", "field": "text", "delta": "lo"}),
            ),
            // Completion reported before the part's final text.
            ev("message.updated", json!({"info": info(true)})),
            ev(
                "message.part.updated",
                json!({"part": {"id": "p1", "messageID": "msg_a", "type": "text", "text": "Hello!", "time": {"end": 3}}}),
            ),
            ev("session.idle", json!({})),
        ] {
            out.extend(m.map(&e));
        }
        let deltas: Vec<&AgentEvent> = out
            .iter()
            .filter(|e| matches!(e, AgentEvent::TextDelta(_)))
            .collect();
        assert_eq!(
            deltas,
            [
                &AgentEvent::TextDelta("Hel".into()),
                &AgentEvent::TextDelta("lo".into())
            ]
        );
        let Some(AgentEvent::TurnEnded(end)) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(
            end.outcome,
            TurnOutcome::Completed {
                result: "Hello!".into()
            }
        );
        assert_eq!(m.pending_bytes, 0);
    }
}
