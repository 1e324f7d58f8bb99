//! Where the installer (tests/rig/install.sh) leaves what it built.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// The cache folder shared by the installer and the rig (outside the clone, keyed by version).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CHATOP_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("chat-operator")
}

/// A binary the installer built; a clear error naming the installer when it is missing.
pub fn cached_bin(name: &str) -> Result<PathBuf> {
    let path = cache_dir().join("bin").join(name);
    if !path.is_file() {
        bail!(
            "the rig needs {name} at {} but it is missing: run tests/rig/install.sh first",
            path.display()
        );
    }
    Ok(path)
}

pub fn redis_server() -> Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let path = PathBuf::from(dir).join("redis-server");
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "the rig needs redis-server (Debian package redis-server): run tests/rig/install.sh first"
    )
}

pub fn ollama_models() -> Result<PathBuf> {
    let path = cache_dir().join("ollama-models");
    if !path.join("manifests").is_dir() {
        bail!(
            "the rig needs the imported model in {}: run tests/rig/install.sh first",
            path.display()
        );
    }
    Ok(path)
}

/// The Python interpreter of the installer's virtual environment (has the `openai` package).
pub fn python() -> Result<PathBuf> {
    let path = cache_dir().join("venv/bin/python");
    if !path.is_file() {
        bail!(
            "the rig's Python environment is missing at {}: run tests/rig/install.sh first",
            path.display()
        );
    }
    Ok(path)
}

/// The rig's instruction-tuned chat model (install step chat-model), as Ollama names it.
pub const CHAT_MODEL: &str = "smollm2:135m";

/// The chat model's own tokenizer as a `tokenizer.json` (install step tokenizer, made from its
/// GGUF file by tests/rig/tokenizer_from_gguf.py).
pub fn chat_model_tokenizer() -> Result<PathBuf> {
    let path = cache_dir().join("tokenizers/smollm2-135m.json");
    if !path.is_file() {
        bail!(
            "the chat model's tokenizer is missing at {}: run tests/rig/install.sh tokenizer",
            path.display()
        );
    }
    Ok(path)
}

/// The installer's `node_modules` folder holding the `openai` npm package (for `NODE_PATH`).
pub fn npm_openai_modules() -> Result<PathBuf> {
    let path = cache_dir().join("npm/node_modules");
    if !path.join("openai/package.json").is_file() {
        bail!(
            "the `openai` npm package is missing under {}: run tests/rig/install.sh npm-openai",
            path.display()
        );
    }
    Ok(path)
}
