//! What every fuzz target checks besides "no panic": a refusal of client input is a client error
//! with the API's error body, and a back end's stream decodes the same whatever pieces the
//! network cut it into.

use chat_service::backend::{Chunk, EndpointError, StreamDecoder};
use chat_service::config::Protocol;
use chat_service::http::AppError;

/// The `maxMessageBytes` the targets check against (small, so the fuzzer reaches the limit).
pub const MAX_MESSAGE_BYTES: usize = 256;

/// A refusal must be the client's error (4xx), with a code and a message, as JSON.
pub fn assert_client_refusal(error: &AppError) {
    let status = error.status();
    assert!(
        status.is_client_error(),
        "{status} for client input: {error:?}"
    );
    let body = serde_json::to_value(error.body()).expect("error bodies serialise");
    assert_eq!(body["error"]["code"], error.code(), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{body}");
}

/// Decodes `data` whole and again in pieces whose sizes follow `piece_seed`, and checks that
/// both give the same chunks, that at most one final chunk or error comes, and that it is last.
pub fn check_stream(protocol: Protocol, piece_seed: u8, data: &[u8]) {
    let mut whole = StreamDecoder::new(protocol);
    let mut expected = whole.feed(data);
    expected.extend(whole.finish());

    let mut pieces = StreamDecoder::new(protocol);
    let mut got = Vec::new();
    let mut rest = data;
    let mut size = usize::from(piece_seed % 17) + 1;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        got.extend(pieces.feed(piece));
        rest = tail;
        size = size * 7 % 23 + 1;
    }
    got.extend(pieces.finish());
    assert_eq!(
        describe(&got),
        describe(&expected),
        "pieces changed the decoding"
    );

    let terminal = |item: &Result<Chunk, EndpointError>| {
        !matches!(item, Ok(Chunk::Token(_) | Chunk::ToolCalls(_)))
    };
    let terminals = expected.iter().filter(|item| terminal(item)).count();
    assert_eq!(terminals, 1, "one end, done or failed: {expected:?}");
    assert!(expected.last().is_some_and(terminal), "{expected:?}");
    assert!(whole.ended() && pieces.ended());
    assert!(
        whole.feed(b"{\"done\":true}\n").is_empty(),
        "nothing after the end"
    );
}

fn describe(items: &[Result<Chunk, EndpointError>]) -> Vec<String> {
    items
        .iter()
        .map(|item| match item {
            Ok(chunk) => format!("{chunk:?}"),
            Err(error) => format!("error: {error}"),
        })
        .collect()
}
