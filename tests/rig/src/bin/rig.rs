//! `rig up [--only PARTS] [--env-file FILE]`: starts the rig, writes its description to FILE
//! (JSON; tests attach when `CHATOP_RIG_ENV` names it) and runs until SIGINT/SIGTERM or `rig down`.
//! `rig down [--env-file FILE]`: stops the rig that FILE describes.
//! `rig node [--kubeconfig F | --env-file FILE] [--name N] [--images]`: runs a real node
//! (kubelet, containerd, kube-scheduler, kube-proxy, bridge CNI, CoreDNS, kube-router: see
//! `chat_rig::kubelet_node`) for that API server until SIGINT/SIGTERM, then stops its pods,
//! cleans up and puts back every sysctl and nftables rule it changed. `--images` first builds
//! (or takes from the cache) the product and stand-in images (`chat_rig::images`) from the
//! binaries beside this one and imports them into the node.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chat_rig::{Parts, Rig, RigInfo};

fn default_env_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/rig/rig.json")
}

fn usage() -> ! {
    eprintln!(
        "usage: rig up [--only kubernetes,redis,mongodb,ollama,tls-stores] [--env-file FILE]"
    );
    eprintln!("       rig down [--env-file FILE]");
    eprintln!("       rig node [--kubeconfig FILE | --env-file FILE] [--name NAME] [--images]");
    std::process::exit(2)
}

struct Args {
    command: String,
    parts: Parts,
    env_file: PathBuf,
    kubeconfig: Option<PathBuf>,
    node_name: Option<String>,
    images: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_else(|| usage());
    let mut parts = Parts::ALL;
    let mut env_file = default_env_file();
    let mut kubeconfig = None;
    let mut node_name = None;
    let mut images = false;
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--only" => parts = Parts::parse(&value())?,
            "--env-file" => env_file = PathBuf::from(value()),
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(value())),
            "--name" => node_name = Some(value()),
            "--images" => images = true,
            _ => usage(),
        }
    }
    Ok(Args {
        command,
        parts,
        env_file,
        kubeconfig,
        node_name,
        images,
    })
}

fn up(parts: Parts, env_file: PathBuf) -> Result<()> {
    if let Ok(text) = std::fs::read_to_string(&env_file)
        && let Ok(info) = serde_json::from_str::<RigInfo>(&text)
        && std::path::Path::new(&format!("/proc/{}", info.pid)).exists()
    {
        bail!(
            "a rig is already running (pid {}, described in {}); run `rig down` first",
            info.pid,
            env_file.display()
        );
    }
    let dir = chat_rig::run_dir()?.join("rig");
    let rig = Rig::start(&dir, parts)?;
    if let Some(parent) = env_file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let text = serde_json::to_string_pretty(rig.info())?;
    // Written whole, then renamed: a waiting reader never sees half a file.
    let tmp = env_file.with_extension("tmp");
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, &env_file)?;
    println!("{text}");
    println!(
        "rig is up; attach tests with: export CHATOP_RIG_ENV={}",
        env_file.display()
    );

    wait_for_stop_signal()?;
    eprintln!("[rig] stopping");
    let _ = std::fs::remove_file(&env_file);
    drop(rig);
    Ok(())
}

fn down(env_file: PathBuf) -> Result<()> {
    let text = match std::fs::read_to_string(&env_file) {
        Ok(text) => text,
        Err(_) => {
            println!(
                "no rig is described in {}; nothing to stop",
                env_file.display()
            );
            return Ok(());
        }
    };
    let info: RigInfo = serde_json::from_str(&text).context("parsing the rig description")?;
    let proc_dir = format!("/proc/{}", info.pid);
    if std::path::Path::new(&proc_dir).exists() {
        Command::new("kill")
            .args(["-TERM", &info.pid.to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::path::Path::new(&proc_dir).exists() {
            if Instant::now() > deadline {
                bail!("the rig (pid {}) did not stop within 30 s", info.pid);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = std::fs::remove_file(&env_file);
    println!("rig stopped");
    Ok(())
}

fn node(
    kubeconfig: Option<PathBuf>,
    env_file: PathBuf,
    name: Option<String>,
    images: bool,
) -> Result<()> {
    let kubeconfig = match kubeconfig {
        Some(k) => k,
        None => Rig::attach(&env_file)?
            .info()
            .kubeconfig
            .clone()
            .context("the rig runs without kubernetes")?,
    };
    // Built before the node starts, so that a long cold build holds no node.
    let archives = if images {
        let started = Instant::now();
        let profile = chat_rig::images::cargo_profile_dir()?;
        let archives = chat_rig::images::workspace_images(&profile)?;
        eprintln!(
            "[node] {} images ready in {:.1} s",
            archives.len(),
            started.elapsed().as_secs_f64()
        );
        Some(archives)
    } else {
        None
    };
    let mut options = chat_rig::kubelet_node::KubeletNodeOptions::default();
    if let Some(name) = name {
        options.name = name;
    }
    let node = chat_rig::kubelet_node::KubeletNode::start_with_kubeconfig(&kubeconfig, options)?;
    if let Some(archives) = &archives {
        node.import_images(archives)?;
    }
    let info = node.info().clone();
    println!(
        "node {} is up (kubelet, node IP {}, Ready in {:.1} s, folder {}); stop it with SIGINT or SIGTERM",
        info.name,
        info.node_ip,
        info.bring_up.as_secs_f64(),
        info.dir.display()
    );
    wait_for_stop_signal()?;
    eprintln!("[node] stopping");
    node.stop()
}

fn main() {
    let result = parse_args().and_then(|args| match args.command.as_str() {
        "up" => up(args.parts, args.env_file),
        "down" => down(args.env_file),
        "node" => node(args.kubeconfig, args.env_file, args.node_name, args.images),
        _ => usage(),
    });
    if let Err(e) = result {
        eprintln!("rig: {e:#}");
        std::process::exit(1);
    }
}

/// Blocks until SIGINT (Ctrl-C) or SIGTERM.
fn wait_for_stop_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        anyhow::Ok(())
    })
}
