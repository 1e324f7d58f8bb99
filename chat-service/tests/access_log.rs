//! The access log (`accessLog`) of the real binary: off by default (no line per request at
//! `info`), every request when on, one in `sampleEvery` when sampled. The back end is the named
//! fixture `FlakyUpstream` (healthy), so that the requests are quick and all alike.

mod support;

use serde_json::{Value, json};
use support::binary::{Binary, start_binary};
use support::flaky::{FlakyUpstream, Mode};
use support::pool::{backend, config_with};
use support::rig;

const ROUTE: &str = "/v1/chat/completions";

/// Sends `count` stateless completions, one after the other.
async fn completions(binary: &Binary, count: usize) {
    let http = reqwest::Client::new();
    for i in 0..count {
        let response = http
            .post(format!("{}{ROUTE}", binary.base))
            .json(&json!({"model": rig().model(), "messages": [{"role": "user", "content": format!("hi {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
}

/// The access-log lines of the binary's log for `ROUTE`; and every `info` line about a
/// response, whatever its target.
fn access_lines(binary: &Binary) -> (Vec<Value>, usize) {
    let lines: Vec<Value> = binary
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let responses = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "response")
        .count();
    let access = lines
        .into_iter()
        .filter(|l| l["target"] == "access" && l["span"]["route"] == ROUTE)
        .collect();
    (access, responses)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_is_off_by_default_and_logs_every_or_one_in_n_requests_when_on() {
    let fixture = FlakyUpstream::start(Mode::Healthy).await;
    let config = || config_with(vec![backend("fixture", &fixture.url)]);

    let quiet = start_binary(config()).await;
    completions(&quiet, 5).await;
    let (access, responses) = access_lines(&quiet);
    assert_eq!((access.len(), responses), (0, 0), "{}", quiet.log());
    drop(quiet);

    let mut every = config();
    every.access_log.enabled = true;
    let every = start_binary(every).await;
    completions(&every, 4).await;
    let (access, _) = access_lines(&every);
    assert_eq!(access.len(), 4, "{}", every.log());
    let line = &access[0];
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["fields"]["status"], 200, "{line}");
    assert_eq!(line["span"]["method"], "POST", "{line}");
    assert!(
        line["span"]["request_id"]
            .as_str()
            .is_some_and(|id| id.len() == 32),
        "{line}"
    );
    drop(every);

    let mut sampled = config();
    sampled.access_log.enabled = true;
    sampled.access_log.sample_every = 3;
    let sampled = start_binary(sampled).await;
    // Nothing else reaches the service meanwhile: 9 requests in a row are 3 samples, whatever
    // the count of the start-up probes before them.
    completions(&sampled, 9).await;
    let (access, _) = access_lines(&sampled);
    assert_eq!(access.len(), 3, "{}", sampled.log());
}
