//! Turns Claude Code frames into [`AgentEvent`]s, and says which frames need an answer
//! (tool approvals are refused while no approver is wired, so a turn never hangs on one).

use super::protocol::{self, ContentBlock, ControlRequest, Frame, ResultOutcome, StreamEvent};
use crate::events::Usage;
use crate::provider::{AgentEvent, TurnEnd, TurnOutcome};

/// One thing the reader must do with a frame.
#[derive(Debug)]
pub enum Mapped {
    Event(AgentEvent),
    Control {
        request_id: String,
        ok: bool,
        error: Option<String>,
    },
    /// A line to write back to the CLI at once.
    Reply(String),
}

/// Per-process mapping state: the text of the message being streamed and the running cost
/// total (the CLI reports totals; events carry per-turn costs).
#[derive(Debug, Default)]
pub struct Mapper {
    message_id: Option<String>,
    message_text: String,
    previous_total_cost: Option<f64>,
}

impl Mapper {
    pub fn map(&mut self, frame: Frame) -> Vec<Mapped> {
        let ev = |e| vec![Mapped::Event(e)];
        match frame {
            Frame::StreamEvent(se) => match se {
                StreamEvent::MessageStart { message_id, .. } => {
                    self.message_id = Some(message_id);
                    self.message_text.clear();
                    vec![]
                }
                StreamEvent::TextDelta {
                    text,
                    parent_tool_use_id: None,
                    ..
                } => ev(AgentEvent::TextDelta(text)),
                StreamEvent::ThinkingDelta {
                    thinking,
                    parent_tool_use_id: None,
                    ..
                } => ev(AgentEvent::ThinkingDelta(thinking)),
                StreamEvent::MessageStop => match self.message_id.take() {
                    Some(id) => ev(AgentEvent::MessageCompleted {
                        id,
                        text: std::mem::take(&mut self.message_text),
                    }),
                    None => vec![],
                },
                _ => vec![],
            },
            Frame::Assistant(a) => {
                let mut out = Vec::new();
                for block in std::iter::once(a.block).chain(a.extra_blocks) {
                    match block {
                        ContentBlock::Text { text } if a.parent_tool_use_id.is_none() => {
                            self.message_text.push_str(&text);
                        }
                        ContentBlock::ToolUse { id, name, input } => {
                            out.push(Mapped::Event(AgentEvent::ToolStarted { id, name, input }));
                        }
                        _ => {}
                    }
                }
                if a.is_api_error {
                    out.push(Mapped::Event(AgentEvent::Raw(serde_json::json!({
                        "type": "api_error", "error": a.error, "status": a.api_error_status,
                    }))));
                }
                out
            }
            Frame::User(u) => u
                .tool_results
                .into_iter()
                .map(|r| {
                    Mapped::Event(AgentEvent::ToolCompleted {
                        id: r.tool_use_id,
                        output: r.content,
                        is_error: r.is_error,
                    })
                })
                .collect(),
            Frame::ControlResponse {
                request_id,
                ok,
                error,
                ..
            } => vec![Mapped::Control {
                request_id,
                ok,
                error,
            }],
            Frame::ControlRequest {
                request_id,
                request,
            } => match request {
                ControlRequest::CanUseTool { .. } => vec![Mapped::Reply(protocol::deny_tool(
                    &request_id,
                    "tool approval over the API is not available; allow the tool with allowed_tools",
                ))],
                ControlRequest::Other { subtype, .. } => {
                    vec![Mapped::Reply(protocol::control_error(
                        &request_id,
                        &format!("unsupported control request: {subtype}"),
                    ))]
                }
            },
            Frame::Result(r) => {
                let cost = r.turn_cost_usd(self.previous_total_cost);
                if r.total_cost_usd.is_some() {
                    self.previous_total_cost = r.total_cost_usd;
                }
                let usage = Usage {
                    input_tokens: r.usage.input_tokens as i64,
                    output_tokens: r.usage.output_tokens as i64,
                    cache_read_tokens: r.usage.cache_read_input_tokens as i64,
                    cache_write_tokens: r.usage.cache_creation_input_tokens as i64,
                    cost_usd: cost,
                    duration_ms: r.duration_ms as i64,
                    model: r.model(),
                };
                let outcome = match r.outcome() {
                    ResultOutcome::Success => TurnOutcome::Completed {
                        result: r.result.clone().unwrap_or_default(),
                    },
                    ResultOutcome::Interrupted => TurnOutcome::Interrupted,
                    ResultOutcome::Error { message } => TurnOutcome::Failed { error: message },
                    ResultOutcome::MaxTurns => TurnOutcome::Failed {
                        error: "the agent reached its turn limit".into(),
                    },
                };
                ev(AgentEvent::TurnEnded(TurnEnd { outcome, usage }))
            }
            Frame::System { subtype, raw }
                if subtype == "api_retry" || subtype == "permission_denied" =>
            {
                ev(AgentEvent::Raw(raw))
            }
            Frame::Unknown(raw) => ev(AgentEvent::Raw(raw)),
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_lines(lines: &[&str]) -> Vec<Mapped> {
        let mut m = Mapper::default();
        lines
            .iter()
            .flat_map(|l| m.map(protocol::parse_line(l).unwrap()))
            .collect()
    }

    #[test]
    fn a_streamed_turn_becomes_deltas_a_message_and_an_end() {
        let out = map_lines(&[
            r#"{"type":"stream_event","event":{"type":"message_start","message":{"id":"msg_1","model":"m","usage":{}}}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}}"#,
            r#"{"type":"assistant","message":{"id":"msg_1","model":"m","content":[{"type":"text","text":"Hello"}]}}"#,
            r#"{"type":"stream_event","event":{"type":"message_stop"}}"#,
            r#"{"type":"result","subtype":"success","is_error":false,"result":"Hello","duration_ms":5,"usage":{"input_tokens":3,"output_tokens":2},"total_cost_usd":0.5}"#,
        ]);
        let events: Vec<&AgentEvent> = out
            .iter()
            .filter_map(|m| {
                if let Mapped::Event(e) = m {
                    Some(e)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(events[0], &AgentEvent::TextDelta("Hel".into()));
        assert_eq!(
            events[1],
            &AgentEvent::MessageCompleted {
                id: "msg_1".into(),
                text: "Hello".into()
            }
        );
        let AgentEvent::TurnEnded(end) = events[2] else {
            panic!("{events:?}")
        };
        assert_eq!(
            end.outcome,
            TurnOutcome::Completed {
                result: "Hello".into()
            }
        );
        assert_eq!(end.usage.input_tokens, 3);
        assert!((end.usage.cost_usd - 0.5).abs() < 1e-9);
    }

    #[test]
    fn tool_approvals_are_answered_not_left_hanging() {
        let out = map_lines(&[
            r#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"rm x"},"tool_use_id":"t1"}}"#,
        ]);
        assert!(
            matches!(&out[0], Mapped::Reply(line) if line.contains("\"r1\"") && line.contains("deny"))
        );
    }
}
