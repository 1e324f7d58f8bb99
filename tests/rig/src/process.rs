//! Child processes of the rig, and the watchdog that stops them when this process goes away.
//!
//! Each server runs in its own process group so that its helpers (Ollama's runners, for example)
//! go with it. A small watchdog shell, fed the process-group ids on its stdin, signals every group
//! once that pipe closes: that happens however this process ends (normal exit, panic, abort or
//! SIGKILL), so no test failure leaves a server behind.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const WATCHDOG_SCRIPT: &str = r#"
groups=" "
while read -r line; do
  case $line in
    +*) groups="$groups${line#+} " ;;
    -*) groups=$(printf '%s' "$groups" | sed "s/ ${line#-} / /") ;;
  esac
done
for g in $groups; do kill -TERM -- "-$g" 2>/dev/null; done
sleep 3
for g in $groups; do kill -KILL -- "-$g" 2>/dev/null; done
"#;

struct Watchdog {
    stdin: Mutex<ChildStdin>,
}

fn watchdog() -> Result<&'static Watchdog> {
    static WATCHDOG: OnceLock<std::result::Result<Watchdog, String>> = OnceLock::new();
    WATCHDOG
        .get_or_init(|| {
            let mut child = Command::new("bash")
                .args(["-c", WATCHDOG_SCRIPT])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(|e| format!("cannot start the rig's watchdog shell (bash): {e}"))?;
            let stdin = child.stdin.take().expect("piped stdin");
            // The watchdog outlives us by design; it is reaped by init.
            std::mem::forget(child);
            Ok(Watchdog {
                stdin: Mutex::new(stdin),
            })
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn tell_watchdog(line: String) -> Result<()> {
    let dog = watchdog()?;
    let mut stdin = dog.stdin.lock().unwrap_or_else(|p| p.into_inner());
    writeln!(stdin, "{line}").context("writing to the rig's watchdog")?;
    stdin.flush().context("writing to the rig's watchdog")
}

/// Sends `signal` (a name such as TERM or KILL) to every process in group `pgid`.
pub fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A server process started by the rig; stopped (TERM, then KILL) when dropped.
pub struct ManagedProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ManagedProcess {
    /// Starts `cmd` in its own process group with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("{name}: cannot open log file {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().with_context(|| {
            format!(
                "{name}: cannot start {:?}; is it installed? (run tests/rig/install.sh)",
                cmd.get_program()
            )
        })?;
        tell_watchdog(format!("+{}", child.id()))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Err` with the exit status when the process has already ended.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            None => bail!("{} was stopped", self.name),
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => bail!("{} exited early with {status}", self.name),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// The exit status once the process has ended (`None` while it runs or after `stop`).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Stops the process group: TERM, up to `grace` to exit, then KILL.
    pub fn stop_with_grace(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = child.id();
        if matches!(child.try_wait(), Ok(None)) {
            signal_group(pgid, "TERM");
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Whatever is left of the group (helpers of a server that exited) goes too.
        signal_group(pgid, "KILL");
        let _ = child.wait();
        let _ = tell_watchdog(format!("-{pgid}"));
    }

    pub fn stop(&mut self) {
        self.stop_with_grace(Duration::from_secs(10));
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
