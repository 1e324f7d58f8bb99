//! Ollama's NDJSON as a back end streams it, in pieces: the first byte seeds the piece sizes.
#![no_main]

use chat_service::config::Protocol;
use chat_service_fuzz::check_stream;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&seed, stream)) = data.split_first() {
        check_stream(Protocol::Ollama, seed, stream);
    }
});
