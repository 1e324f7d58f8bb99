//! Readers for streamed HTTP bodies as the tests and benches see them: Server-Sent Events
//! (`text/event-stream`, the chat service's streaming answers and OpenAI's chunks) and NDJSON
//! (`application/x-ndjson`, Ollama's native streaming API), parsed whole or line by line as the
//! bytes arrive.

use serde_json::Value;

/// One Server-Sent Event: its `event:` name (`message` when it has none) and its `data:` lines
/// joined by newlines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub name: String,
    pub data: String,
}

impl SseEvent {
    /// The data as JSON; panics naming the event when it is not (a test wants to know).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| {
            panic!(
                "event {:?} data is not JSON ({e}): {}",
                self.name, self.data
            )
        })
    }
}

/// Parses a whole `text/event-stream` body. Blocks without data (comments, keep-alives) are
/// left out, as a browser's EventSource leaves them out.
pub fn parse_sse(body: &str) -> Vec<SseEvent> {
    let mut events = Vec::new();
    for block in body.split("\n\n") {
        let mut name = String::from("message");
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(value) = line.strip_prefix("event:") {
                name = value.trim().to_string();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push(value.strip_prefix(' ').unwrap_or(value).to_string());
            }
        }
        if !data.is_empty() {
            events.push(SseEvent {
                name,
                data: data.join("\n"),
            });
        }
    }
    events
}

/// The text of the chat service's `token` events (`{"content": "..."}`), joined in order.
pub fn join_tokens(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.name == "token")
        .map(|e| e.json()["content"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Splits NDJSON arriving in pieces into JSON values, one a complete line; a partial line waits
/// for the rest. Lines that are not JSON are skipped (a stream cut mid-line, a blank line).
#[derive(Debug, Default)]
pub struct NdjsonLines {
    buffer: Vec<u8>,
}

impl NdjsonLines {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a piece and returns the values of the lines it completed.
    pub fn push(&mut self, piece: &[u8]) -> Vec<Value> {
        self.buffer.extend_from_slice(piece);
        let mut values = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            if let Ok(value) = serde_json::from_slice::<Value>(&line) {
                values.push(value);
            }
        }
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sse_blocks_become_named_events_with_joined_data() {
        let body = ": keep-alive\n\nevent: token\ndata: {\"content\":\"Hel\"}\n\n\
                    event: token\ndata:{\"content\":\"lo\"}\n\ndata: a\ndata: b\n\n\
                    event: done\ndata: {\"message\":\"Hello\"}\n\n";
        let events = parse_sse(body);
        let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["token", "token", "message", "done"]);
        assert_eq!(events[2].data, "a\nb");
        assert_eq!(join_tokens(&events), "Hello");
        assert_eq!(events[3].json(), json!({"message": "Hello"}));
    }

    #[test]
    fn ndjson_lines_split_across_pieces_are_read_once_whole() {
        let mut lines = NdjsonLines::new();
        assert!(
            lines
                .push(b"{\"message\":{\"content\":\"a\"}}\n{\"do")
                .len()
                == 1
        );
        assert!(lines.push(b"ne\":").is_empty());
        let rest = lines.push(b"true}\nnot json\n\n");
        assert_eq!(rest, [json!({"done": true})]);
    }
}
