//! How the back-end pool spreads turns, against real Ollamas: session affinity and its load
//! bound, weights, per-model routing and DNS discovery. Where two endpoints must be told apart
//! while both generate for real, each is an `OllamaCallCountingProxy` in front of the rig's
//! Ollama: two URLs, one real model, and an exact count of generation requests per endpoint.

mod support;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_service::backend::{Resolver, StaticResolver};
use chat_service::config::Strategy;
use serde_json::json;
use support::flaky::{FlakyUpstream, Mode, REPLY};
use support::pool::{
    backend, backends_status, chat, chat_streamed, config_with, endpoint, serve, successes,
    wait_for_endpoint,
};
use support::{OllamaCallCountingProxy, rig};

#[tokio::test(flavor = "multi_thread")]
async fn session_affinity_keeps_each_session_on_one_backend_across_turns() {
    let rig = rig();
    let a = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let b = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let mut config = config_with(vec![backend("a", &a.url), backend("b", &b.url)]);
    config.routing.strategy = Strategy::SessionAffinity;
    config.context.max_output_tokens = 4;
    let service = serve(config).await;
    let mut homes = Vec::new();
    for s in 0..6 {
        let session = format!("affinity-{s}-{}", chat_rig::unique_name("s"));
        let before = (a.chat_calls(), b.chat_calls());
        for turn in 0..3 {
            let (status, _, body) = chat(
                &service,
                json!({"session_id": session, "message": format!("Turn {turn}")}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
        let delta = (a.chat_calls() - before.0, b.chat_calls() - before.1);
        assert!(
            delta == (3, 0) || delta == (0, 3),
            "session {s} moved between back ends: {delta:?}"
        );
        homes.push(if delta.0 == 3 { "a" } else { "b" });
    }
    println!(
        "6 sessions x 3 turns, homes: {homes:?} (a served {}, b {})",
        a.chat_calls(),
        b.chat_calls()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn session_affinity_spills_to_the_next_backend_when_the_home_is_at_its_limit() {
    let one = FlakyUpstream::start(Mode::Healthy).await;
    let two = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![backend("one", &one.url), backend("two", &two.url)]);
    config.routing.strategy = Strategy::SessionAffinity;
    config.routing.max_in_flight_per_backend = 1;
    config.routing.queue_depth = 4;
    let service = Arc::new(serve(config).await);
    let session = chat_rig::unique_name("spill");
    let (status, _, body) =
        chat(&service, json!({"session_id": session, "message": "home?"})).await;
    assert_eq!(status, 200, "{body}");
    let (home, other, home_name) = if one.received("home?") {
        (&one, &two, "one")
    } else {
        (&two, &one, "two")
    };
    home.set_latency(Duration::from_secs(3));
    other.set_latency(Duration::from_millis(200));
    let slow = {
        let service = service.clone();
        let session = session.clone();
        tokio::spawn(async move {
            chat(
                &service,
                json!({"session_id": session, "message": "slow turn"}),
            )
            .await
        })
    };
    wait_for_endpoint(&service, home_name, "home busy", |e| e["inFlight"] == 1).await;
    let started = Instant::now();
    let (status, _, body) = chat(
        &service,
        json!({"session_id": session, "message": "spilled turn"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let spilled_in = started.elapsed();
    assert!(
        other.received("spilled turn"),
        "spilled to the other back end"
    );
    assert!(!home.received("spilled turn"));
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(home.received("slow turn"));
    // With the home free again, the session returns to it.
    home.set_latency(Duration::ZERO);
    let (status, _, _) = chat(
        &service,
        json!({"session_id": session, "message": "back home"}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(home.received("back home"));
    println!(
        "home `{home_name}` at its limit of 1: the next turn spilled and answered in {spilled_in:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_round_robin_splits_turns_by_weight() {
    let rig = rig();
    let heavy = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let light = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let mut heavy_backend = backend("heavy", &heavy.url);
    heavy_backend.weight = 3;
    let mut config = config_with(vec![heavy_backend, backend("light", &light.url)]);
    config.routing.strategy = Strategy::RoundRobin;
    config.context.max_output_tokens = 4;
    let service = serve(config).await;
    for i in 0..12 {
        let (status, _, body) = chat(&service, json!({"message": format!("Count {i}")})).await;
        assert_eq!(status, 200, "{body}");
    }
    println!(
        "12 turns, weights 3:1 -> heavy {}, light {}",
        heavy.chat_calls(),
        light.chat_calls()
    );
    assert_eq!((heavy.chat_calls(), light.chat_calls()), (9, 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_served_by_one_backend_only_goes_there() {
    let rig = rig();
    let general = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let special = FlakyUpstream::start(Mode::Healthy).await;
    let mut general_backend = backend("general", &general.url);
    general_backend.models = vec![rig.model().into()];
    let mut special_backend = backend("special", &special.url);
    special_backend.models = vec!["fixture-model".into()];
    let mut config = config_with(vec![special_backend, general_backend]);
    config.models.allowed = vec![rig.model().into(), "fixture-model".into()];
    let service = serve(config).await;
    for i in 0..3 {
        let (status, _, body) = chat(&service, json!({"message": format!("general {i}")})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], rig.model());
    }
    for i in 0..2 {
        let (status, _, body) = chat(
            &service,
            json!({"message": format!("special {i}"), "model": "fixture-model"}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["message"], REPLY.concat());
    }
    assert_eq!(general.chat_calls(), 3);
    assert_eq!(special.chat_calls(), 2);
    assert!(
        special
            .recorded()
            .iter()
            .all(|r| r.model == "fixture-model")
    );
    let status = backends_status(&service).await;
    assert_eq!(
        endpoint(&status, "special")["models"],
        json!(["fixture-model"])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_discovery_makes_one_endpoint_per_address() {
    // Listening on every address, so 127.0.0.2 and 127.0.0.3 reach it too.
    let pods = FlakyUpstream::start_on("0.0.0.0:0".parse().unwrap(), Mode::Healthy).await;
    let mut discovered = backend("pods", &pods.url);
    discovered.discover_dns = Some("localhost".into());
    let mut config = config_with(vec![discovered]);
    config.routing.strategy = Strategy::RoundRobin;
    let service = serve(config).await;

    // The system resolver: `localhost` is 127.0.0.1 here (and ::1 where /etc/hosts says so).
    let status = backends_status(&service).await;
    let names: Vec<&str> = status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"pods/127.0.0.1"), "{status}");
    let local = endpoint(&status, "pods/127.0.0.1");
    assert_eq!(local["url"], format!("http://127.0.0.1:{}", pods.port()));
    assert_eq!(local["backend"], "pods");

    // Three "pods" behind one name.
    let resolver = Arc::new(StaticResolver::new());
    let three: Vec<IpAddr> = ["127.0.0.3", "127.0.0.1", "127.0.0.2"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    resolver.set("localhost", three);
    service.state.backends.set_resolver(resolver.clone()).await;
    let status = backends_status(&service).await;
    assert_eq!(status["total"], 3, "{status}");
    for i in 0..6 {
        let (status, _, body) = chat(&service, json!({"message": format!("pod {i}")})).await;
        assert_eq!(status, 200, "{body}");
    }
    for pod in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        let served = successes(&service, "pods", &format!("pods/{pod}")).await;
        assert_eq!(served, 2.0, "{pod}");
    }
    // A pod goes away: its endpoint (and its gauges) go with it.
    resolver.set("localhost", vec!["127.0.0.2".parse().unwrap()]);
    service.state.backends.refresh_discovery().await;
    let status = backends_status(&service).await;
    assert_eq!(status["total"], 1, "{status}");
    assert_eq!(status["backends"][0]["name"], "pods/127.0.0.2");
    let metrics = service.metrics_text().await;
    assert!(
        metrics.contains(r#"chat_backend_up{backend="pods",endpoint="pods/127.0.0.2"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"chat_backend_up{backend="pods",endpoint="pods/127.0.0.3"}"#));
}

/// Answers after a pause: a named stand-in for a slow DNS server.
struct SlowResolver {
    pause: Duration,
    addresses: Vec<IpAddr>,
}

impl Resolver for SlowResolver {
    fn resolve<'a>(
        &'a self,
        _host: &'a str,
        _port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move {
            tokio::time::sleep(self.pause).await;
            Ok(self.addresses.clone())
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_older_resolution_never_overwrites_a_newer_one() {
    let pods = FlakyUpstream::start_on("0.0.0.0:0".parse().unwrap(), Mode::Healthy).await;
    let mut discovered = backend("pods", &pods.url);
    discovered.discover_dns = Some("localhost".into());
    let service = serve(config_with(vec![discovered])).await;
    let backends = &service.state.backends;
    backends
        .set_resolver(Arc::new(SlowResolver {
            pause: Duration::from_millis(600),
            addresses: vec!["127.0.0.1".parse().unwrap()],
        }))
        .await;
    assert_eq!(backends_status(&service).await["total"], 1);
    // A periodic refresh is still waiting for the slow answer (one address) when the name is
    // found to have three: the newer answer must be the one that stays.
    let three = Arc::new(StaticResolver::new());
    let addresses: Vec<IpAddr> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    three.set("localhost", addresses);
    futures::join!(backends.refresh_discovery(), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        backends.set_resolver(three.clone()).await;
    });
    let status = backends_status(&service).await;
    assert_eq!(status["total"], 3, "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_back_end_is_asked_to_stream_only_when_the_client_streams() {
    // The recording fixture notes each request's `stream` field; a JSON client's turn asks for
    // a whole answer (one read, one parse), a streaming client's for a stream.
    let recording = FlakyUpstream::start(Mode::Healthy).await;
    let service = serve(config_with(vec![backend("recording", &recording.url)])).await;
    let session = chat_rig::unique_name("shape");
    let (status, _, body) = chat(&service, json!({"session_id": session, "message": "json"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], REPLY.concat(), "{body}");
    assert_eq!(body["usage"]["completion_tokens"], REPLY.len(), "{body}");
    let (status, tokens, last, data) = chat_streamed(
        &service,
        json!({"session_id": session, "message": "sse", "stream": true}),
    )
    .await;
    assert_eq!((status, last.as_str()), (200, "done"), "{data}");
    assert_eq!(tokens, REPLY.concat());
    for stream in [false, true] {
        let response = service
            .http
            .post(service.url("/v1/chat/completions"))
            .json(&json!({"model": rig().model(), "stream": stream,
                "messages": [{"role": "user", "content": format!("openai {stream}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(
            text.contains(REPLY[0]) && (!stream || text.contains("[DONE]")),
            "{text}"
        );
    }
    let asked: Vec<(String, bool)> = recording
        .recorded()
        .into_iter()
        .map(|r| (r.last_message, r.stream))
        .collect();
    assert_eq!(
        asked,
        [
            ("json".to_string(), false),
            ("sse".to_string(), true),
            ("openai false".to_string(), false),
            ("openai true".to_string(), true),
        ]
    );
    let stored = service.all_messages(&session).await;
    assert_eq!(stored[1]["content"], REPLY.concat(), "{stored:?}");
    assert_eq!(stored[1]["incomplete"], false, "{stored:?}");
}
