//! The router driven with `tower::ServiceExt::oneshot`: everything the HTTP edge decides on its
//! own (authentication, rate limits, validation, size limits, admission, routing, error shape,
//! request ids), with the history in [`MemoryHistory`] (a test double), Redis and the back end at
//! addresses where nothing listens, so no store and no model need to run.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::config::{BackendConfig, Config, Protocol};
use crate::conversation::{ContextMessage, FinishReason, Principal, Role, SessionId, SessionKey};
use crate::history::{MemoryHistory, NewTurn};
use crate::http::error::ErrorReport;
use crate::metrics::Metrics;
use crate::state::{AppState, SharedState, StateParts, redis_connection};

/// Ports where nothing listens: connections are refused at once.
const NO_REDIS: &str = "redis://127.0.0.1:9";
const NO_BACKEND: &str = "http://127.0.0.1:9";
const API_KEY: &str = "the-right-key";
const MODEL: &str = "test-model";

struct TestRouter {
    state: SharedState,
    router: Router,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    has_error_report: bool,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }

    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

fn config(configure: impl FnOnce(&mut Config)) -> Config {
    let mut config: Config = serde_yaml::from_str(
        r#"
backends: []
models: { default: placeholder }
history: {}
"#,
    )
    .unwrap();
    config.backends = vec![BackendConfig {
        name: "nowhere".into(),
        url: NO_BACKEND.into(),
        protocol: Protocol::Ollama,
        weight: 1,
        api_key_env: None,
        discover_dns: None,
        models: vec![],
    }];
    config.models.default = MODEL.into();
    config.models.allowed = vec![MODEL.into()];
    config.limits.max_message_bytes = 100;
    configure(&mut config);
    config.validate().unwrap();
    config
}

async fn router(configure: impl FnOnce(&mut Config)) -> TestRouter {
    let config = config(configure);
    let parts = StateParts {
        metrics: Arc::new(Metrics::new()),
        redis: redis_connection(NO_REDIS).unwrap(),
        history: Arc::new(MemoryHistory::default()),
        records: None,
        idempotency: None,
        backend_api_keys: vec![None],
        api_keys: Some(API_KEY.into()),
    };
    let state = AppState::from_parts(config, parts).await.unwrap();
    TestRouter {
        router: super::router(state.clone()),
        state,
    }
}

impl TestRouter {
    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let has_error_report = response.extensions().get::<ErrorReport>().is_some();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer {
            status,
            headers,
            body,
            has_error_report,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    async fn post_json(&self, path: &str, body: &Value) -> Answer {
        self.send(json_request(Method::POST, path, body.to_string()))
            .await
    }
}

fn json_request(method: Method, path: &str, body: String) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap()
}

fn is_generated_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn healthz_answers_and_every_response_carries_a_request_id() {
    let service = router(|_| {}).await;
    let health = service.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body, json!({ "status": "ok" }));
    assert!(is_generated_id(health.header("x-request-id")));
    assert!(health.header("x-process-time").parse::<f64>().is_ok());

    let not_found = service.get("/no/such/route").await;
    assert!(is_generated_id(not_found.header("x-request-id")));

    let sane = Request::get("/healthz")
        .header("x-request-id", "caller-id.1:a_b")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        service.send(sane).await.header("x-request-id"),
        "caller-id.1:a_b"
    );
    let insane = Request::get("/healthz")
        .header("x-request-id", "two words")
        .body(Body::empty())
        .unwrap();
    assert!(is_generated_id(
        service.send(insane).await.header("x-request-id")
    ));
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let service = router(|_| {}).await;
    let unknown = service.get("/v2/nothing").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.code(), "not_found");
    assert_eq!(unknown.message(), "no such route");

    let wrong_method = service.get("/v1/chat").await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.code(), "method_not_allowed");
    assert!(is_generated_id(wrong_method.header("x-request-id")));
}

#[tokio::test]
async fn the_api_describes_itself() {
    let service = router(|_| {}).await;
    let document = service.get("/openapi.json").await;
    assert_eq!(document.status, StatusCode::OK);
    for path in [
        "/v1/chat",
        "/v1/chat/completions",
        "/ws/chat",
        "/v1/sessions/{id}",
    ] {
        assert!(document.body["paths"][path].is_object(), "{path} missing");
    }
    assert!(document.body["components"]["schemas"]["ErrorBody"].is_object());
    // The `model` fields list the allow-list of this deployment, as `/v1/models` does.
    let models = service.get("/v1/models").await;
    let allowed: Vec<&Value> = models.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["id"])
        .collect();
    for request in ["ChatRequest", "CompletionRequest"] {
        let listed =
            &document.body["components"]["schemas"][request]["properties"]["model"]["enum"];
        let listed: Vec<&Value> = listed.as_array().expect("an enum").iter().collect();
        assert_eq!(listed, allowed, "{request}");
    }

    let page = service.get("/docs").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.as_str().unwrap().contains("/v1/chat/completions"));
}

#[tokio::test]
async fn api_routes_need_a_valid_key_and_probes_do_not() {
    let service = router(|config| config.auth.enabled = true).await;
    let with = |name: &str, value: &str| {
        Request::get("/v1/models")
            .header(name, value)
            .body(Body::empty())
            .unwrap()
    };
    for answer in [
        service.get("/v1/models").await,
        service.send(with("x-api-key", "the-wrong-key")).await,
        service
            .send(with("authorization", "Bearer the-wrong-key"))
            .await,
        service
            .send(with("authorization", &format!("Basic {API_KEY}")))
            .await,
    ] {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.code(), "unauthorized");
        assert_eq!(answer.message(), "a valid API key is required");
        assert_eq!(answer.header("www-authenticate"), "Bearer");
    }
    let bearer = service
        .send(with("authorization", &format!("Bearer {API_KEY}")))
        .await;
    assert_eq!(bearer.status, StatusCode::OK);
    assert_eq!(bearer.body["data"][0]["id"], MODEL);
    assert_eq!(
        service.send(with("x-api-key", API_KEY)).await.status,
        StatusCode::OK
    );
    assert_eq!(service.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(service.state.metrics.auth_rejected.get(), 4);
}

#[tokio::test]
async fn over_budget_callers_get_429_from_the_local_limiter_while_redis_is_down() {
    let service = router(|config| {
        config.rate_limit.enabled = true;
        config.rate_limit.requests_per_window = 2;
        config.rate_limit.window_seconds = 60;
    })
    .await;
    for remaining in ["1", "0"] {
        let admitted = service.get("/v1/models").await;
        assert_eq!(admitted.status, StatusCode::OK);
        assert_eq!(admitted.header("ratelimit-limit"), "2");
        assert_eq!(admitted.header("ratelimit-remaining"), remaining);
        assert_eq!(admitted.header("ratelimit-policy"), "2;w=60");
    }
    let refused = service.get("/v1/models").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.code(), "rate_limited");
    assert!(
        refused
            .message()
            .starts_with("rate limit exceeded: requests per window")
    );
    let retry_after: u64 = refused.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(refused.header("ratelimit-remaining"), "0");
    // Probes are not limited.
    assert_eq!(service.get("/healthz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_chat_requests_are_refused_with_the_offending_field() {
    let service = router(|_| {}).await;
    let cases = [
        (json!({ "message": 5 }), "invalid_json", "message"),
        (
            json!({ "message": "hi", "color": "red" }),
            "invalid_json",
            "color",
        ),
        (
            json!({ "message": "   " }),
            "invalid_request",
            "message: must not be empty",
        ),
        (
            json!({ "message": "hi", "session_id": "not valid" }),
            "invalid_session_id",
            "session id must match",
        ),
        (
            json!({ "message": "hi", "temperature": 3.0 }),
            "invalid_request",
            "temperature: must be between 0 and 2",
        ),
        (
            json!({ "message": "hi", "model": "someone-elses" }),
            "model_not_allowed",
            "someone-elses",
        ),
    ];
    for (body, code, mentioned) in cases {
        let answer = service.post_json("/v1/chat", &body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer.code(), code, "{body}");
        assert!(
            answer.message().contains(mentioned),
            "{body}: {}",
            answer.message()
        );
        assert!(!answer.has_error_report, "client errors are not logged");
    }
    let not_json = Request::post("/v1/chat")
        .body(Body::from("message=hi"))
        .unwrap();
    let answer = service.send(not_json).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.code(), "invalid_json");
}

#[tokio::test]
async fn malformed_completion_requests_are_refused_with_the_offending_field() {
    let service = router(|_| {}).await;
    let cases = [
        (
            json!({ "model": MODEL, "messages": [{ "role": "tool", "content": "x" }] }),
            "messages[0].tool_call_id: required for role `tool`",
        ),
        (
            json!({ "model": MODEL, "messages": [
                { "role": "user", "content": [{ "type": "image_url" }] }
            ] }),
            "messages[0].content[0].type: `image_url` parts are not accepted: the back ends of this service take text only",
        ),
        (
            json!({ "model": MODEL, "messages": [{ "role": "assistant", "content": "x" }] }),
            "messages: the last message must have role `user` or `tool`",
        ),
    ];
    for (body, message) in cases {
        let answer = service.post_json("/v1/chat/completions", &body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer.code(), "invalid_request");
        assert_eq!(answer.message(), message);
    }
    let bad_session = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-session-id", "no/slashes")
        .body(Body::from(
            json!({ "model": MODEL, "messages": [{ "role": "user", "content": "x" }] }).to_string(),
        ))
        .unwrap();
    assert_eq!(service.send(bad_session).await.code(), "invalid_session_id");
}

#[tokio::test]
async fn oversized_messages_and_bodies_answer_413() {
    let service = router(|_| {}).await;
    let long = service
        .post_json("/v1/chat", &json!({ "message": "x".repeat(101) }))
        .await;
    assert_eq!(long.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(long.code(), "payload_too_large");
    assert_eq!(long.message(), "message is 101 bytes, the limit is 100");

    // Past the body limit (4 × the message limit + 64 KiB) the body is never parsed.
    let huge = json!({ "message": "x".repeat(70 * 1024) }).to_string();
    let answer = service
        .send(json_request(Method::POST, "/v1/chat", huge))
        .await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.message(), "request body exceeds the size limit");
}

#[tokio::test]
async fn a_full_service_sheds_api_requests_with_503_and_retry_after() {
    let service = router(|config| config.limits.max_concurrent_requests = 2).await;
    let _held = service
        .state
        .admission
        .clone()
        .try_acquire_many_owned(2)
        .unwrap();
    let shed = service.get("/v1/models").await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.code(), "overloaded");
    assert_eq!(shed.header("retry-after"), "1");
    assert_eq!(service.get("/healthz").await.status, StatusCode::OK);
    drop(_held);
    assert_eq!(service.get("/v1/models").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_failing_back_end_answers_503_without_internals() {
    let service = router(|config| config.routing.max_attempts = 1).await;
    let answer = service
        .post_json("/v1/chat", &json!({ "message": "hello" }))
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.code(), "backend_unavailable");
    assert_eq!(answer.message(), "no language-model back end is available");
    assert!(!answer.body.to_string().contains("127.0.0.1"));
    assert_eq!(answer.header("retry-after"), "1");
    assert!(
        !answer.has_error_report,
        "observe logs and strips the report"
    );
}

#[tokio::test]
async fn stored_sessions_are_paged_and_erased() {
    let service = router(|_| {}).await;
    let session = SessionKey::new(
        &Principal::shared(),
        SessionId::parse("paged-session").unwrap(),
    );
    for (reply, reason) in [
        ("first", FinishReason::Stop),
        ("second", FinishReason::Length),
    ] {
        service
            .state
            .history
            .append_turn(
                &session,
                NewTurn {
                    end_user: None,
                    input: &[ContextMessage::new(Role::User, "question")],
                    reply,
                    tool_calls: &[],
                    model: MODEL,
                    finish_reason: &reason,
                    incomplete: false,
                },
            )
            .await
            .unwrap();
    }
    let page = service
        .get("/v1/sessions/paged-session/messages?limit=3")
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.body["session_id"], "paged-session");
    let messages = page.body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[0]["role"], "user");
    assert!(messages[0].get("finish_reason").is_none());
    assert_eq!(messages[1]["content"], "first");
    assert_eq!(messages[1]["finish_reason"], "stop");
    assert_eq!(page.body["next_cursor"], "3");
    let rest = service
        .get("/v1/sessions/paged-session/messages?cursor=3")
        .await;
    assert_eq!(rest.body["messages"][0]["finish_reason"], "length");
    assert_eq!(rest.body["next_cursor"], Value::Null);

    for (query, mentioned) in [
        ("limit=0", "limit"),
        ("cursor=-1", "cursor"),
        ("limit=x", "limit"),
    ] {
        let answer = service
            .get(&format!("/v1/sessions/paged-session/messages?{query}"))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(answer.code(), "invalid_request");
        assert!(answer.message().contains(mentioned), "{}", answer.message());
    }
    let unknown = service.get("/v1/sessions/never-seen/messages").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.message(), "session `never-seen` not found");
    assert_eq!(
        service.get("/v1/sessions/bad%20id/messages").await.code(),
        "invalid_session_id"
    );

    let delete = || {
        Request::delete("/v1/sessions/paged-session")
            .body(Body::empty())
            .unwrap()
    };
    let erased = service.send(delete()).await;
    assert_eq!(erased.status, StatusCode::OK);
    assert_eq!(
        erased.body,
        json!({ "session_id": "paged-session", "deleted_messages": 4, "cache_erased": true })
    );
    assert_eq!(service.send(delete()).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn readiness_follows_the_durable_store_and_metrics_count_requests() {
    let service = router(|_| {}).await;
    let ready = service.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.body["status"], "ready");
    assert_eq!(ready.body["backends"][0]["name"], "nowhere");

    service.get("/v1/models").await;
    let metrics = service.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.lines()
            .any(|line| line.starts_with("chat_http_requests_total")
                && line.contains(r#"route="/v1/models""#)
                && line.contains(r#"status="200""#)),
        "{text}"
    );
}
