//! Text frames on `/ws/chat` (the server has already refused frames that are not UTF-8).
#![no_main]

use chat_service::http::parsers;
use chat_service_fuzz::{MAX_MESSAGE_BYTES, assert_client_refusal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = parsers::websocket_frame(text, MAX_MESSAGE_BYTES) {
        assert_client_refusal(&error);
    }
});
