//! The client side of Server-Sent Events: an incremental parser that turns the bytes of a
//! `text/event-stream` body into events, for hotplex's own clients (the management CLI, the
//! tests, the benchmarks). It follows the WHATWG rules that matter for our streams: LF, CRLF
//! or CR line ends, `:` comments, multi-line `data:`, and one optional space after the colon.

/// One event: its `id:`, `event:` and `data:` fields (data lines joined with `\n`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Feeds chunks in, takes complete events out.
#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes of an incomplete line.
    line: Vec<u8>,
    /// The event being assembled.
    current: Frame,
    has_data: bool,
    /// The previous chunk ended in CR: a following LF belongs to that line end.
    after_cr: bool,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `chunk` and returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(frame) = self.line_done(&line) {
                        out.push(frame);
                    }
                }
                _ => self.line.push(b),
            }
        }
        out
    }

    fn line_done(&mut self, line: &[u8]) -> Option<Frame> {
        if line.is_empty() {
            // A blank line dispatches the event; one without data is dropped (per spec).
            let frame = std::mem::take(&mut self.current);
            let had_data = std::mem::take(&mut self.has_data);
            return had_data.then_some(frame);
        }
        if line[0] == b':' {
            return None;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks_with_any_line_end() {
        let mut p = Parser::new();
        let text = b": keep-alive\n\nid: 1\nevent: text.delta\ndata: {\"a\":1}\n\nid:2\r\ndata: x\r\ndata: y\r\n\r\n";
        let mut frames = Vec::new();
        for chunk in text.chunks(3) {
            frames.extend(p.push(chunk));
        }
        assert_eq!(
            frames,
            vec![
                Frame {
                    id: Some("1".into()),
                    event: Some("text.delta".into()),
                    data: "{\"a\":1}".into()
                },
                Frame {
                    id: Some("2".into()),
                    event: None,
                    data: "x\ny".into()
                },
            ]
        );
    }

    #[test]
    fn an_event_without_data_is_dropped_and_a_partial_one_waits() {
        let mut p = Parser::new();
        assert!(p.push(b"id: 5\n\n").is_empty());
        assert!(p.push(b"data: half").is_empty());
        let got = p.push(b"\n\n");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, "half");
        assert_eq!(
            got[0].id, None,
            "the id of a dropped event does not carry over"
        );
    }
}
