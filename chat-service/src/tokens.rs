//! Counting the tokens of a context: with the model's own tokenizer where the config names one
//! (`context.tokenizers`, a Hugging Face `tokenizer.json`, plain or gzipped, loaded at start),
//! else with the
//! estimate of about 4 bytes per token. Either way each message adds [`FRAMING_TOKENS`] for the
//! chat template's markers around it (role, start and end of turn).

use std::collections::HashMap;
use std::sync::Arc;

use chat_config::ContextConfig;
use serde::Serialize;
use tokenizers::Tokenizer;
use utoipa::ToSchema;

use crate::conversation::ContextMessage;

/// Tokens a chat template adds around each message (ChatML: `<|im_start|>`, the role, a line
/// break, `<|im_end|>`, a line break; Gemma and Llama templates are alike).
pub const FRAMING_TOKENS: u32 = 4;

/// How a model's prompt tokens are counted, as `GET /v1/models` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenCounting {
    /// With the model's own tokenizer.
    Tokenizer,
    /// About 4 bytes per token.
    Estimate,
}

/// A tokenizer that cannot be used, naming the setting and the file.
#[derive(Debug, thiserror::Error)]
#[error(
    "context.tokenizers[{index}].file: cannot load the tokenizer of model {model:?} from {file}: {reason}"
)]
pub struct TokenizerError {
    pub index: usize,
    pub model: String,
    pub file: String,
    pub reason: String,
}

/// The tokenizers of the configured models.
#[derive(Clone, Default)]
pub struct TokenCounter {
    by_model: HashMap<String, Arc<Tokenizer>>,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter")
            .field("models", &self.by_model.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TokenCounter {
    /// Loads every tokenizer `config` names; the first that fails stops start-up.
    pub fn load(config: &ContextConfig) -> Result<Self, TokenizerError> {
        let mut by_model = HashMap::new();
        for (index, entry) in config.tokenizers.iter().enumerate() {
            let tokenizer = read_tokenizer(&entry.file).map_err(|reason| TokenizerError {
                index,
                model: entry.model.clone(),
                file: entry.file.clone(),
                reason,
            })?;
            by_model.insert(entry.model.clone(), Arc::new(tokenizer));
        }
        Ok(Self { by_model })
    }

    pub fn counting(&self, model: &str) -> TokenCounting {
        if self.by_model.contains_key(model) {
            TokenCounting::Tokenizer
        } else {
            TokenCounting::Estimate
        }
    }

    /// Tokens of `message` in a context for `model`, framing included.
    pub fn count(&self, model: &str, message: &ContextMessage) -> u32 {
        let content = match self.by_model.get(model) {
            Some(tokenizer) => tokenizer
                .encode(message.content.as_str(), false)
                .map(|encoding| u32::try_from(encoding.len()).unwrap_or(u32::MAX))
                // A text the tokenizer refuses is still counted, by the estimate.
                .unwrap_or_else(|_| estimate(&message.content)),
            None => estimate(&message.content),
        };
        // Tool calls (rare, and not what tokenizers were fitted on) by the estimate.
        let tool_calls = message
            .tool_calls
            .iter()
            .map(|call| estimate(&call.name).saturating_add(estimate(&call.arguments)))
            .fold(0, u32::saturating_add);
        content
            .saturating_add(tool_calls)
            .saturating_add(FRAMING_TOKENS)
    }
}

/// First bytes of a gzip stream (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A `tokenizer.json` from `path`, gunzipped first when the file is gzip (as a ConfigMap must
/// hold most tokenizers: `kubectl create configmap --from-file=tokenizer.json.gz`).
fn read_tokenizer(path: &str) -> Result<Tokenizer, String> {
    use std::io::Read;
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let json = if bytes.starts_with(&GZIP_MAGIC) {
        let mut json = Vec::with_capacity(bytes.len() * 4);
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut json)
            .map_err(|e| format!("the file is gzip but does not decompress: {e}"))?;
        json
    } else {
        bytes
    };
    Tokenizer::from_bytes(&json).map_err(|e| e.to_string())
}

/// About 4 bytes per token.
pub fn estimate(text: &str) -> u32 {
    u32::try_from(text.len().div_ceil(4)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Role;

    #[test]
    fn a_model_without_a_tokenizer_is_estimated_with_framing() {
        let counter = TokenCounter::default();
        let message = ContextMessage::new(Role::User, "x".repeat(40));
        assert_eq!(counter.count("any", &message), 10 + FRAMING_TOKENS);
        assert_eq!(counter.counting("any"), TokenCounting::Estimate);
    }

    #[test]
    fn an_unreadable_tokenizer_names_the_setting_model_and_file() {
        let config: ContextConfig = serde_json::from_value(serde_json::json!({
            "tokenizers": [{"model": "m", "file": "/nonexistent/tokenizer.json"}],
        }))
        .unwrap();
        let error = TokenCounter::load(&config).unwrap_err().to_string();
        assert!(
            error.starts_with("context.tokenizers[0].file: cannot load the tokenizer of model \"m\" from /nonexistent/tokenizer.json: "),
            "{error}"
        );
    }

    /// A word-level tokenizer of three words: small enough to write here, real to the crate.
    const WORDS: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
        "decoder":null,"model":{"type":"WordLevel","vocab":{"hello":0,"world":1,"[UNK]":2},
        "unk_token":"[UNK]"}}"#;

    /// A fresh folder of this test process.
    fn scratch(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tokens-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn counter_of(file: &std::path::Path) -> Result<TokenCounter, TokenizerError> {
        let config: ContextConfig = serde_json::from_value(serde_json::json!({
            "tokenizers": [{"model": "m", "file": file}],
        }))
        .unwrap();
        TokenCounter::load(&config)
    }

    #[test]
    fn a_gzipped_tokenizer_counts_like_the_plain_file() {
        use std::io::Write;
        let dir = scratch("gzipped");
        let plain = dir.join("tokenizer.json");
        std::fs::write(&plain, WORDS).unwrap();
        let gzipped = dir.join("tokenizer.json.gz");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(WORDS.as_bytes()).unwrap();
        std::fs::write(&gzipped, encoder.finish().unwrap()).unwrap();

        let message = ContextMessage::new(Role::User, "hello world hello nope");
        for file in [&plain, &gzipped] {
            let counter = counter_of(file).unwrap();
            assert_eq!(counter.counting("m"), TokenCounting::Tokenizer);
            // Four words, one of them unknown: four tokens, plus the framing.
            assert_eq!(counter.count("m", &message), 4 + FRAMING_TOKENS, "{file:?}");
        }
    }

    #[test]
    fn a_truncated_gzip_file_is_refused_with_the_reason() {
        let file = scratch("truncated").join("tokenizer.json.gz");
        std::fs::write(&file, [0x1f, 0x8b, 0x08, 0x00, 0x00]).unwrap();
        let error = counter_of(&file).unwrap_err().to_string();
        assert!(
            error.contains("the file is gzip but does not decompress"),
            "{error}"
        );
    }
}
