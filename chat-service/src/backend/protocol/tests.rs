//! The request bodies and the decoding of answers, per protocol.

use super::*;
use crate::conversation::Sampling;

/// The body `request_body` writes for `protocol` with `sampling`, as JSON.
fn body_with(protocol: Protocol, sampling: &Sampling) -> serde_json::Value {
    let request = GenerationRequest {
        model: "m",
        messages: &[],
        max_tokens: 8,
        temperature: None,
        sampling,
        request_id: "r",
        stream: false,
        session_id: None,
    };
    serde_json::to_value(request_body(protocol, "m", &request)).unwrap()
}

#[test]
fn sampling_options_go_where_each_protocol_reads_them() {
    let sampling = Sampling {
        top_p: Some(0.5),
        seed: Some(42),
        stop: vec!["\n\n".into()],
        format: OutputFormat::JsonObject,
        ..Sampling::default()
    };
    let ollama = body_with(Protocol::Ollama, &sampling);
    assert_eq!(
        ollama["options"],
        json!({"num_predict": 8, "top_p": 0.5, "seed": 42, "stop": ["\n\n"]})
    );
    assert_eq!(ollama["format"], json!("json"));
    let openai = body_with(Protocol::Openai, &sampling);
    for (field, value) in [
        ("max_tokens", json!(8)),
        ("top_p", json!(0.5)),
        ("seed", json!(42)),
        ("stop", json!(["\n\n"])),
        ("response_format", json!({"type": "json_object"})),
    ] {
        assert_eq!(openai[field], value, "{field} in {openai}");
    }
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
    let structured = Sampling {
        format: OutputFormat::JsonSchema {
            name: "answer".into(),
            schema: schema.clone(),
            strict: true,
        },
        ..Sampling::default()
    };
    assert_eq!(body_with(Protocol::Ollama, &structured)["format"], schema);
    let untouched = body_with(Protocol::Ollama, &Sampling::default());
    assert_eq!(
        untouched["options"],
        json!({"num_predict": 8}),
        "unset options stay the back end's"
    );
    assert!(untouched.get("format").is_none(), "{untouched}");
}

#[test]
fn ollama_lines_parse_to_tokens_and_usage() {
    let token = parse_ollama_line(
        r#"{"message":{"role":"assistant","content":"Hi"},"done":false}"#,
        &mut StreamedToolCalls::default(),
    );
    assert_eq!(token.unwrap(), Some(Chunk::Token("Hi".into())));
    let done = parse_ollama_line(
        r#"{"message":{"role":"assistant","content":""},"done":true,"done_reason":"length","prompt_eval_count":12,"eval_count":4}"#,
        &mut StreamedToolCalls::default(),
    );
    assert_eq!(
        done.unwrap(),
        Some(Chunk::Done {
            usage: Usage::new(12, 4),
            finish_reason: "length".into()
        })
    );
}

#[test]
fn openai_stream_holds_finish_reason_until_usage() {
    let mut pending = None;
    let mut calls = StreamedToolCalls::default();
    let token = parse_openai_line(
        r#"data: {"choices":[{"delta":{"content":"a"}}]}"#,
        &mut pending,
        &mut calls,
    );
    assert_eq!(token.unwrap(), Some(Chunk::Token("a".into())));
    let finish = parse_openai_line(
        r#"data: {"choices":[{"delta":{},"finish_reason":"length"}]}"#,
        &mut pending,
        &mut calls,
    );
    assert_eq!(finish.unwrap(), None);
    let usage = parse_openai_line(
        r#"data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
        &mut pending,
        &mut calls,
    );
    assert_eq!(
        usage.unwrap(),
        Some(Chunk::Done {
            usage: Usage::new(7, 3),
            finish_reason: "length".into()
        })
    );
    assert_eq!(
        parse_openai_line(": keep-alive", &mut pending, &mut calls).unwrap(),
        None
    );
}

#[test]
fn whole_answers_decode_to_their_text_and_final_chunk() {
    let ollama = decode_whole(
        Protocol::Ollama,
        br#"{"model":"m","message":{"role":"assistant","content":"Hello there"},"done":true,"done_reason":"length","prompt_eval_count":9,"eval_count":2}"#,
    )
    .unwrap();
    assert_eq!(
        ollama,
        [
            Chunk::Token("Hello there".into()),
            Chunk::Done {
                usage: Usage::new(9, 2),
                finish_reason: "length".into()
            }
        ]
    );
    let openai = decode_whole(
        Protocol::Openai,
        br#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#,
    )
    .unwrap();
    assert_eq!(
        openai,
        [
            Chunk::Token("Hi".into()),
            Chunk::Done {
                usage: Usage::new(4, 1),
                finish_reason: "stop".into()
            }
        ]
    );
    let error = decode_whole(Protocol::Ollama, br#"{"error":"model not found"}"#);
    assert!(matches!(error, Err(EndpointError::Malformed(e)) if e == "model not found"));
    assert!(decode_whole(Protocol::Openai, b"{\"choices\":[]}").is_err());
}

#[test]
fn a_stream_decodes_the_same_in_any_pieces() {
    let stream = "{\"message\":{\"content\":\"Hé\"},\"done\":false}\r\n\n{\"message\":{\"content\":\"llo\"}}\n{\"done\":true,\"eval_count\":2}\n{\"ignored\":1}\n";
    let mut whole = StreamDecoder::new(Protocol::Ollama);
    let mut expected = whole.feed(stream.as_bytes());
    expected.extend(whole.finish());
    // Nothing after the final message, not even the line that follows it.
    assert_eq!(expected.len(), 3, "{expected:?}");
    assert_eq!(expected[0].as_ref().unwrap(), &Chunk::Token("Hé".into()));
    let expected = format!("{expected:?}");
    let mut bytewise = StreamDecoder::new(Protocol::Ollama);
    let mut got = Vec::new();
    for byte in stream.as_bytes() {
        got.extend(bytewise.feed(std::slice::from_ref(byte)));
    }
    got.extend(bytewise.finish());
    assert_eq!(format!("{got:?}"), expected);
    assert!(bytewise.ended());
}

#[test]
fn an_openai_stream_without_usage_ends_with_its_held_finish_reason() {
    let mut decoder = StreamDecoder::new(Protocol::Openai);
    let mut chunks = decoder.feed(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}",
    );
    chunks.extend(decoder.finish());
    let chunks: Vec<Chunk> = chunks.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        chunks,
        [
            Chunk::Token("a".into()),
            Chunk::Done {
                usage: Usage::new(0, 1),
                finish_reason: "length".into()
            }
        ]
    );
}

#[test]
fn tool_calls_come_whole_just_before_the_end_in_both_protocols() {
    let called = |chunks: &[Chunk]| match chunks {
        [Chunk::ToolCalls(calls), Chunk::Done { finish_reason, .. }] => {
            assert_eq!(finish_reason, "tool_calls");
            calls
                .iter()
                .map(|c| format!("{}{}", c.name, c.arguments))
                .collect::<Vec<_>>()
        }
        other => panic!("{other:?}"),
    };
    let ollama = concat!(
        r#"{"message":{"content":"","tool_calls":[{"function":{"name":"f","arguments":{"x":1}}}]},"done":false}"#,
        "\n",
        r#"{"message":{"content":""},"done":true,"done_reason":"stop"}"#,
        "\n"
    );
    let mut decoder = StreamDecoder::new(Protocol::Ollama);
    let chunks: Vec<Chunk> = decoder
        .feed(ollama.as_bytes())
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(called(&chunks), [r#"f{"x":1}"#]);
    let whole = decode_whole(
        Protocol::Ollama,
        ollama
            .lines()
            .next()
            .unwrap()
            .replace("false", "true")
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(called(&whole), [r#"f{"x":1}"#]);
    let openai = concat!(
        r#"data: {"choices":[{"delta":{"role":"assistant","tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
        "\n\n",
        r#"data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"x\":1}"}}]}}]}"#,
        "\n\n",
        r#"data: {"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
        "\n\ndata: [DONE]\n\n"
    );
    let mut decoder = StreamDecoder::new(Protocol::Openai);
    let chunks: Vec<Chunk> = decoder
        .feed(openai.as_bytes())
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(called(&chunks), [r#"f{"x":1}"#]);
    let whole = decode_whole(
        Protocol::Openai,
        br#"{"choices":[{"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_9","type":"function","function":{"name":"g","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#,
    )
    .unwrap();
    assert_eq!(called(&whole), ["g{}"]);
}
