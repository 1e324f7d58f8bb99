//! The published API description against the running service: schemathesis (PyPI, installed by
//! `tests/rig/install.sh python`) generates requests from `/openapi.json`, valid and invalid,
//! sends them to the service on the rig's real Redis, FerretDB and Ollama, and fails on any 5xx,
//! any status the document does not list for the operation, and any body that breaks the
//! documented schema.

mod support;

use std::process::Command;
use std::time::Instant;

use support::{rig, start_with_api_keys, test_config};

const KEY: &str = "openapi-key-0123456789abcdef";
/// The version `tests/rig/install.sh` installs; a different one may check differently.
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// The `schemathesis` command next to the test Python (`CHATOP_PYTHON`, else the rig's venv).
fn schemathesis() -> std::path::PathBuf {
    let python = support::python();
    let command = python.with_file_name("schemathesis");
    let version = Command::new(&command).arg("--version").output();
    match version {
        Ok(output) if String::from_utf8_lossy(&output.stdout).contains(SCHEMATHESIS_VERSION) => {
            command
        }
        Ok(output) => panic!(
            "{} is not schemathesis {SCHEMATHESIS_VERSION} ({}{}): run `bash tests/rig/install.sh python`",
            command.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) => panic!(
            "schemathesis is missing: {} cannot run ({e}); it is installed next to {} by `bash tests/rig/install.sh python`",
            command.display(),
            python.display()
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_answers_as_its_openapi_document_says() {
    let command = schemathesis();
    let rig = rig();
    let mut config = test_config(rig);
    config.auth.enabled = true;
    // Valid turns are answered by the real Ollama: one token each keeps the run short.
    config.context.max_output_tokens = 1;
    let service = start_with_api_keys(config, rig.redis_url(), rig.mongodb_url(), Some(KEY)).await;
    let report_dir = std::env::temp_dir().join(chat_rig::unique_name("schemathesis"));
    std::fs::create_dir_all(&report_dir).unwrap();
    // Written as it runs, so that a slow run can be followed (`tail -f`).
    let output_path = report_dir.join("output.txt");
    println!("schemathesis output: {}", output_path.display());
    let output_file = std::fs::File::create(&output_path).unwrap();
    let started = Instant::now();
    let url = service.url("/openapi.json");
    let base = service.base.clone();
    let status = tokio::task::spawn_blocking(move || {
        Command::new(command)
            .arg("run")
            .arg(&url)
            .args(["--url", &base])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,response_schema_conformance",
            ])
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--max-examples", "25"])
            .args(["--seed", "14"])
            // One worker: with two, its threads build Hypothesis's filter descriptions with
            // `ast.parse` at once, and CPython 3.11's AST constructor keeps one recursion depth
            // per interpreter, not per thread; a CI run failed on "SystemError: AST constructor
            // recursion depth mismatch (before=69, after=118)", with every request conforming.
            .args(["--workers", "1"])
            .args(["--request-timeout", "60"])
            .args(["--header", &format!("Authorization: Bearer {KEY}")])
            .args(["--suppress-health-check", "too_slow"])
            .arg("--report-dir")
            .arg(&report_dir)
            // Its cache (`.schemathesis/`) goes there too, not into the work tree.
            .current_dir(&report_dir)
            .env("NO_COLOR", "1")
            .stdout(output_file.try_clone().unwrap())
            .stderr(output_file)
            .status()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let stdout = std::fs::read_to_string(&output_path).unwrap_or_default();
    let tail: String = {
        let all: Vec<char> = stdout.chars().collect();
        all[all.len().saturating_sub(8_000)..].iter().collect()
    };
    println!(
        "schemathesis finished in {:.0} s:\n{tail}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "schemathesis found responses that break /openapi.json (exit {:?}):\n{tail}",
        status.code()
    );
}
