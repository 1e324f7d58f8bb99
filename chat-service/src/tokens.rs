//! Counting the tokens of a context: with the model's own tokenizer where the config names one
//! (`context.tokenizers`, a Hugging Face `tokenizer.json` loaded at start), else with the
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
            let tokenizer = Tokenizer::from_file(&entry.file).map_err(|e| TokenizerError {
                index,
                model: entry.model.clone(),
                file: entry.file.clone(),
                reason: e.to_string(),
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
}
