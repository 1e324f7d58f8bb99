//! `POST /v1/chat` bodies: JSON parsing and the checks before any store is touched.
#![no_main]

use chat_service::http::parsers;
use chat_service_fuzz::{MAX_MESSAGE_BYTES, assert_client_refusal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(error) = parsers::chat_request(data, MAX_MESSAGE_BYTES) {
        assert_client_refusal(&error);
    }
});
