//! The official OpenAI clients as tests run them: the `openai` Python package (in the test
//! Python, `CHATOP_PYTHON`) and the `openai` npm package (the installer's copy), each running a
//! script that prints one JSON document. Both are installed by `tests/rig/install.sh`; a test
//! fails, never skips, without them.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use super::TestService;

/// The test Python, checked to import `openai`.
pub fn python() -> PathBuf {
    let python = super::python();
    match Command::new(&python).args(["-c", "import openai"]).output() {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "{} cannot import `openai` (run tests/rig/install.sh python): {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run {}: {e}", python.display()),
    }
}

/// `node` with `NODE_PATH` at the installer's copy of the `openai` npm package.
pub fn node() -> Command {
    let modules = chat_rig::paths::npm_openai_modules().unwrap_or_else(|e| panic!("{e:#}"));
    let mut node = Command::new("node");
    node.env("NODE_PATH", modules);
    node
}

/// Runs a client script (`program` is `python` or `node` with its script argument) with the
/// base URL, `model` and `key` as arguments; its stdout is one JSON document.
pub async fn run_client(
    mut program: Command,
    service: &TestService,
    model: &str,
    key: &str,
    label: &str,
) -> Value {
    program.args([service.base.as_str(), model, key]);
    let output = tokio::task::spawn_blocking(move || program.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot run the {label} client: {e}"));
    assert!(
        output.status.success(),
        "{label} client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{label} client printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
