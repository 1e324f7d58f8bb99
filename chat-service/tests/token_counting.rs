//! Prompt tokens counted with the model's own tokenizer (`context.tokenizers`), against the real
//! SmolLM2 model in the rig's Ollama: `/v1/models` says which models get their tokenizer and
//! which the estimate; with the tokenizer the context the service sends stays within
//! `context.maxContextTokens` as the model itself counts it (Ollama's `prompt_eval_count`), where
//! the bytes/4 estimate sends several times the budget for the same conversation of numbers.
//! Ollama's counts are read through the named fixture `support::OllamaCallCountingProxy`.
//! The tokenizer is the one the model's GGUF file carries (install step tokenizer).

mod support;

use chat_rig::paths::{CHAT_MODEL, chat_model_tokenizer};
use chat_service::config::{BackendConfig, Config, TokenizerConfig};
use serde_json::json;
use support::{OllamaCallCountingProxy, rig, start, test_config};

/// The rig's chat model through `backend_url`, with `budget` context tokens and, when `tokenizer`,
/// its tokenizer; the rig's other model allowed too (it has no tokenizer configured).
fn config(backend_url: &str, budget: u32, tokenizer: bool) -> Config {
    let rig = rig();
    let mut config = test_config(rig);
    config.backends = vec![BackendConfig::ollama("ollama", backend_url)];
    config.models.default = CHAT_MODEL.into();
    config.models.allowed = vec![CHAT_MODEL.into(), rig.model().into()];
    config.context.max_context_tokens = budget;
    config.context.max_output_tokens = 4;
    if tokenizer {
        let file = chat_model_tokenizer().unwrap_or_else(|e| panic!("{e:#}"));
        config.context.tokenizers = vec![TokenizerConfig {
            model: CHAT_MODEL.into(),
            file: file.display().to_string(),
        }];
    }
    config.validate().expect("a valid config");
    config
}

/// Thirty four-digit numbers: the model's tokenizer splits digits one by one, so ~150 tokens
/// where the estimate counts 37.
fn numbers(turn: u64) -> String {
    (0..30)
        .map(|i| format!("{:04}", (turn * 7919 + i * 104_729) % 10_000))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Six turns of numbers in one session; the model's count of each context sent.
async fn conversation(tokenizer: bool, budget: u32) -> Vec<u64> {
    let rig = rig();
    let proxy = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let service = start(
        config(&proxy.url, budget, tokenizer),
        rig.redis_url(),
        rig.mongodb_url(),
    )
    .await;
    let mut session: Option<String> = None;
    for turn in 0..6 {
        let mut body = json!({"message": format!("Remember: {}", numbers(turn))});
        if let Some(id) = &session {
            body["session_id"] = id.clone().into();
        }
        let (status, _, answer) = service.post_json("/v1/chat", &body).await;
        assert_eq!(status, 200, "turn {turn}: {answer}");
        session = answer["session_id"].as_str().map(str::to_string);
    }
    let counts = proxy.prompt_counts();
    assert_eq!(counts.len(), 6, "one generation per turn: {counts:?}");
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn models_say_whether_their_tokenizer_or_the_estimate_counts_them() {
    let rig = rig();
    let service = start(
        config(rig.ollama_url(), 2_048, true),
        rig.redis_url(),
        rig.mongodb_url(),
    )
    .await;
    let (status, models) = service.get_json("/v1/models").await;
    assert_eq!(status, 200, "{models}");
    let counting = |id: &str| {
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["token_counting"].clone())
    };
    assert_eq!(counting(CHAT_MODEL), Some(json!("tokenizer")), "{models}");
    assert_eq!(counting(rig.model()), Some(json!("estimate")), "{models}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_models_tokenizer_the_context_sent_stays_within_the_budget() {
    const BUDGET: u32 = 400;
    // What Ollama's template adds beyond the per-message framing the service counts: the
    // assistant turn it opens for the answer (`<|im_start|>assistant\n`).
    const TEMPLATE_SLACK: u64 = 8;
    let counted = conversation(true, BUDGET).await;
    assert!(
        counted
            .iter()
            .all(|&n| n <= u64::from(BUDGET) + TEMPLATE_SLACK),
        "with the tokenizer every context must stay within {BUDGET} tokens as the model counts \
         them: {counted:?}"
    );
    assert!(
        counted.iter().any(|&n| n > u64::from(BUDGET) / 2),
        "the conversation must come near the budget to show anything: {counted:?}"
    );
    // The same conversation counted by the estimate overshoots the budget several times over.
    let estimated = conversation(false, BUDGET).await;
    assert!(
        estimated.iter().any(|&n| n > 2 * u64::from(BUDGET)),
        "the estimate should have sent far more than the budget, else this test proves \
         nothing: {estimated:?}"
    );
    eprintln!("model's count per turn: tokenizer {counted:?}, estimate {estimated:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_tokenizer_file_stops_start_up_naming_the_setting() {
    let rig = rig();
    let mut config = config(rig.ollama_url(), 2_048, false);
    config.context.tokenizers = vec![TokenizerConfig {
        model: CHAT_MODEL.into(),
        file: "/nonexistent/tokenizer.json".into(),
    }];
    let secrets = chat_service::Secrets {
        redis_url: rig.redis_url().into(),
        mongodb_uri: rig.mongodb_url().into(),
        backend_api_keys: vec![None],
        api_keys: None,
    };
    let error = match chat_service::AppState::new(config, secrets).await {
        Ok(_) => panic!("a service with an unreadable tokenizer must not start"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("context.tokenizers[0].file")
            && error.contains("/nonexistent/tokenizer.json"),
        "{error}"
    );
}
