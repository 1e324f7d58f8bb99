//! `POST /v1/chat/completions` bodies and their `x-session-id` header. The first byte says
//! whether a header is sent (low bit) and how long it is (the other bits); it follows, then the
//! body.
#![no_main]

use chat_service::http::parsers;
use chat_service_fuzz::{MAX_MESSAGE_BYTES, assert_client_refusal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (header, body) = if first & 1 == 1 {
        let (header, body) = rest.split_at(usize::from(first >> 1).min(rest.len()));
        (Some(header), body)
    } else {
        (None, rest)
    };
    if let Err(error) = parsers::completion_request(body, header, MAX_MESSAGE_BYTES) {
        assert_client_refusal(&error);
    }
});
