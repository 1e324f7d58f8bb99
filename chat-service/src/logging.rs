//! The service's log: one JSON object per line, with the fields of the current span (the
//! request's `request_id`, `method` and `route`) under `span`.
//!
//! Span fields are formatted when the span is created, whether or not anything is logged inside
//! it, and the request span is created for every request. tracing-subscriber's own JSON field
//! formatter builds a map of `serde_json::Value`s with an allocated `String` per field and then
//! serialises it: about 7,000 instructions per request (callgrind, `CHATOP_BENCH_ONLY=
//! instructions`) for three short fields. [`SpanFields`] writes the same JSON object straight
//! into the span's buffer.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormattedFields, MakeWriter};

/// Installs the process-wide subscriber: JSON lines to stdout, filtered by `RUST_LOG` (`info`
/// when unset or invalid); records of the `log` crate go to it too.
pub fn init() {
    use tracing_subscriber::util::SubscriberInitExt;
    subscriber(std::io::stdout).init();
}

/// The subscriber [`init`] installs, writing to `writer` (tests write to a buffer).
pub fn subscriber<W>(writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .fmt_fields(SpanFields)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(writer)
        .finish()
}

/// Formats span fields as one JSON object, written without intermediate values.
pub struct SpanFields;

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        write_object(&mut writer, fields)
    }

    /// Fields recorded after the span was created (`Span::record`): appended to the object. A
    /// name recorded twice appears twice, and the reader of the line (serde_json's map, as the
    /// event formatter uses) keeps the last value.
    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        write_object(&mut Writer::new(&mut added), fields)?;
        if added == "{}" {
            return Ok(());
        }
        if current.fields.is_empty() || current.fields == "{}" {
            current.fields = added;
        } else {
            // Both are `{...}`: drop the old closing brace and the new opening one.
            current.fields.pop();
            current.fields.push(',');
            current.fields.push_str(&added[1..]);
        }
        Ok(())
    }
}

fn write_object<R: RecordFields>(writer: &mut Writer<'_>, fields: R) -> fmt::Result {
    let mut visitor = ObjectWriter {
        out: writer,
        empty: true,
        result: Ok(()),
    };
    fields.record(&mut visitor);
    visitor.result?;
    let close = if visitor.empty { "{}" } else { "}" };
    writer.write_str(close)
}

struct ObjectWriter<'a, 'w> {
    out: &'a mut Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl ObjectWriter<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.out.write_str(if self.empty { "{" } else { "," })?;
        self.empty = false;
        write_json_str(&mut *self.out, field.name())?;
        self.out.write_char(':')
    }

    /// Writes one field unless an earlier one failed; the first failure is kept.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self.out));
        }
    }
}

impl Visit for ObjectWriter<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_json_str(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_char('"')?;
            write!(Escaped(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.field(field, |out| write!(out, "{value}"));
        } else {
            // JSON has no NaN or infinity; as text they stay readable.
            self.record_debug(field, &value);
        }
    }
}

fn write_json_str(mut out: impl fmt::Write, value: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(&mut out).write_str(value)?;
    out.write_char('"')
}

/// Writes what it is given as the inside of a JSON string.
struct Escaped<W>(W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, byte) in s.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    /// The JSON lines `log` writes through the service's subscriber.
    fn lines(log: impl FnOnce()) -> Vec<Value> {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(subscriber(buffer.clone()), log);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    #[test]
    fn span_fields_of_every_kind_reach_the_line_as_json() {
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{7} é";
        let lines = lines(|| {
            let span = tracing::info_span!(
                "request",
                request_id = %"0123abcd",
                text = tricky,
                debug = ?("a", 1),
                count = 42u64,
                delta = -7i64,
                ok = true,
                ratio = 0.5f64,
                nan = f64::NAN,
            );
            span.in_scope(|| tracing::warn!(code = "x", "request failed"));
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(
            lines[0]["span"],
            json!({
                "name": "request",
                "request_id": "0123abcd",
                "text": tricky,
                "debug": "(\"a\", 1)",
                "count": 42,
                "delta": -7,
                "ok": true,
                "ratio": 0.5,
                "nan": "NaN",
            }),
            "{}",
            lines[0]
        );
        assert_eq!(lines[0]["fields"]["message"], "request failed");
        assert_eq!(lines[0]["level"], "WARN");
    }

    #[test]
    fn fields_recorded_later_are_added_and_a_span_without_fields_is_an_empty_object() {
        let lines = lines(|| {
            let span = tracing::info_span!(
                "turn",
                session = "s1",
                model = tracing::field::Empty,
                tokens = tracing::field::Empty
            );
            span.record("model", "gemma");
            span.record("tokens", 12u64);
            span.record("model", "smollm2");
            span.in_scope(|| tracing::info!("one"));
            let bare = tracing::info_span!("bare");
            bare.in_scope(|| tracing::info!("two"));
            let late = tracing::info_span!("late", id = tracing::field::Empty);
            late.record("id", "x");
            late.in_scope(|| tracing::info!("three"));
        });
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(
            lines[0]["span"],
            json!({"name": "turn", "session": "s1", "model": "smollm2", "tokens": 12})
        );
        assert_eq!(lines[1]["span"], json!({"name": "bare"}));
        assert_eq!(lines[2]["span"], json!({"name": "late", "id": "x"}));
    }
}
