//! The chart's Argo CD health check (charts/chat-operator/argocd/health.lua) run by a real Lua
//! interpreter, as Argo CD runs it on a live ChatService.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::chart::{chart_dir, describe};

pub fn lua_interpreter() -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join("lua5.4");
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "the Argo CD health check test needs a Lua interpreter at /usr/bin/lua5.4: \
         install the Debian package lua5.4 (apt-get install lua5.4; tests/rig/install.sh's apt step)"
    );
}

/// A JSON value as a Lua table constructor (what Argo CD hands the script as `obj`).
pub fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for b in s.bytes() {
                match b {
                    b'"' => out.push_str("\\\""),
                    b'\\' => out.push_str("\\\\"),
                    0x20..=0x7e => out.push(b as char),
                    other => out.push_str(&format!("\\{other:03}")),
                }
            }
            out.push('"');
            out
        }
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!(
                    "[{}] = {}",
                    lua_literal(&Value::String(k.clone())),
                    lua_literal(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs charts/chat-operator/argocd/health.lua on `obj`; returns (status, message).
pub fn argocd_health(obj: &Value) -> (String, String) {
    let script = chart_dir().join("argocd/health.lua");
    let driver = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(hs.status, \"\\n\", hs.message or \"\", \"\\n\")\n",
        lua_literal(obj),
        lua_literal(&Value::String(script.to_str().unwrap().into()))
    );
    let mut child = Command::new(lua_interpreter())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lua5.4");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(driver.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        describe("lua5.4 health.lua", &out)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    (
        lines.next().unwrap_or_default().to_string(),
        lines.next().unwrap_or_default().to_string(),
    )
}
