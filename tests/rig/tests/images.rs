//! The node's images, built for real with buildah and then run from their archives: each archive
//! is pulled back into buildah's store and its programs run inside it (`buildah run --isolation
//! chroot`, the host's network), as the image's own user.
//!
//! Needs root, buildah and the installer's binaries (tests/rig/install.sh), and the workspace's
//! `chat-service` and `chat-operator` debug binaries (`cargo build --workspace`).

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chat_rig::images::{self, Archives, stand_ins};

/// An image from an archive, as a working container that is removed on drop.
struct Container {
    name: String,
    image: String,
}

impl Container {
    fn from_archive(archives: &Archives, image: &str) -> Container {
        let archive = archives
            .get(image)
            .unwrap_or_else(|| panic!("no archive for {image}; built: {:?}", archives.keys()));
        assert!(archive.is_file(), "{} is not a file", archive.display());
        let pulled = output(
            Command::new("buildah")
                .args(["pull", "-q"])
                .arg(format!("oci-archive:{}", archive.display())),
        );
        let id = pulled.trim().to_string();
        let name = output(Command::new("buildah").args(["from", "--pull=never", &id]))
            .trim()
            .to_string();
        Container { name, image: id }
    }

    /// The image config as `buildah inspect` shows it.
    fn config(&self) -> serde_json::Value {
        let text =
            output(Command::new("buildah").args(["inspect", "--type", "image", &self.image]));
        let inspect: serde_json::Value = serde_json::from_str(&text).expect("buildah inspect JSON");
        inspect["OCIv1"]["config"].clone()
    }

    fn run_cmd(&self, env: &[(&str, &str)], argv: &[&str]) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.args(["run", "--isolation", "chroot"]);
        for (k, v) in env {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        cmd.arg(&self.name).arg("--").args(argv);
        cmd
    }

    fn run(&self, argv: &[&str]) -> Output {
        self.run_cmd(&[], argv)
            .output()
            .expect("running buildah run")
    }

    /// A long-running program in the container; killed (with its children) on drop.
    fn spawn(&self, env: &[(&str, &str)], argv: &[&str]) -> Background {
        let mut cmd = self.run_cmd(env, argv);
        use std::os::unix::process::CommandExt;
        cmd.process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Background(cmd.spawn().expect("spawning buildah run"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["rm", &self.name]).output();
        let _ = Command::new("buildah").args(["rmi", &self.image]).output();
    }
}

struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.0.id())])
            .status();
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(out: &Output) -> String {
    format!(
        "status {}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The built binaries this test binary sits beside (`target/debug`).
fn product_binaries() -> images::ProductBinaries {
    let dir = images::cargo_profile_dir().expect("the Cargo profile folder");
    images::ProductBinaries::in_dir(&dir).expect("the workspace's binaries")
}

fn assert_distroless_like(container: &Container, entrypoint: &str) {
    let config = container.config();
    assert_eq!(config["User"], "65532:65532", "image config: {config}");
    assert_eq!(
        config["Entrypoint"][0], entrypoint,
        "image config: {config}"
    );
    // No shell: the runtime cannot start one.
    let shell = container.run(&["/bin/sh", "-c", "true"]);
    assert!(!shell.status.success(), "a shell ran: {}", text(&shell));
    let ls = container.run(&["ls", "/"]);
    assert!(!ls.status.success(), "ls ran: {}", text(&ls));
}

#[test]
fn product_images_run_their_binary_as_nonroot_with_no_shell() {
    let started = Instant::now();
    let archives = images::product_images(&product_binaries()).expect("building the images");
    eprintln!(
        "product images in {:.1} s: {archives:?}",
        started.elapsed().as_secs_f64()
    );
    for (image, binary, entrypoint) in [
        (
            images::CHAT_SERVICE_IMAGE,
            "chat-service",
            "/usr/local/bin/chat-service",
        ),
        (
            images::CHAT_OPERATOR_IMAGE,
            "chat-operator",
            "/usr/local/bin/chat-operator",
        ),
    ] {
        let container = Container::from_archive(&archives, image);
        assert_distroless_like(&container, entrypoint);
        // The binary runs on the base's glibc and libgcc, as the image's user.
        let version = container.run(&[entrypoint, "--version"]);
        assert!(version.status.success(), "{image}: {}", text(&version));
        assert_eq!(
            String::from_utf8_lossy(&version.stdout).trim(),
            format!("{binary} {}", env!("CARGO_PKG_VERSION")),
            "{image}"
        );
    }
    let config = Container::from_archive(&archives, images::CHAT_SERVICE_IMAGE).config();
    assert!(
        config["Env"].as_array().is_some_and(|env| env
            .iter()
            .any(|e| e == "CHAT_SERVICE_CONFIG=/etc/chat-service/config.yaml")),
        "the Dockerfile's ENV is in the image: {config}"
    );
    // A second call finds every archive in the cache.
    let again = images::product_images(&product_binaries()).expect("the cached images");
    assert_eq!(again, archives);
}

#[test]
fn the_chat_service_image_serves_with_its_config_file() {
    let archives = images::product_images(&product_binaries()).expect("building the images");
    let container = Container::from_archive(&archives, images::CHAT_SERVICE_IMAGE);
    // `--help` lists the options users pass in a pod spec.
    let help = container.run(&["/usr/local/bin/chat-service", "--help"]);
    assert!(help.status.success(), "{}", text(&help));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: chat-service"));
}

#[tokio::test(flavor = "multi_thread")]
async fn stand_in_redis_serves_what_the_operator_runs() {
    let archives = stand_ins_archives();
    let container = Container::from_archive(&archives, stand_ins::REDIS_IMAGE);
    let port = chat_rig::free_port().expect("a free port").to_string();
    // The operator's command, as its Deployment writes it (password from the environment).
    let script = format!(
        "exec redis-server --requirepass \"$REDIS_PASSWORD\" --save '' --appendonly no --dir /tmp --port {port} --bind 127.0.0.1"
    );
    let _server = container.spawn(&[("REDIS_PASSWORD", "s3cret")], &["sh", "-c", &script]);
    let url = format!("redis://:s3cret@127.0.0.1:{port}/");
    let client = redis::Client::open(url.as_str()).expect("redis URL");
    let mut conn = wait_for(|| client.get_connection().ok(), "the stand-in redis-server");
    let pong: String = redis::cmd("PING").query(&mut conn).expect("PING");
    assert_eq!(pong, "PONG");
    // The operator's readiness probe.
    let probe = container
        .run_cmd(
            &[("REDIS_PASSWORD", "s3cret")],
            &[
                "sh",
                "-c",
                &format!(
                    "REDISCLI_AUTH=\"$REDIS_PASSWORD\" redis-cli -p {port} ping | grep -q PONG"
                ),
            ],
        )
        .output()
        .expect("probe");
    assert!(probe.status.success(), "readiness probe: {}", text(&probe));
}

#[tokio::test(flavor = "multi_thread")]
async fn stand_in_mongo_accepts_the_operators_credentials() {
    let archives = stand_ins_archives();
    let container = Container::from_archive(&archives, stand_ins::MONGO_IMAGE);
    let config = container.config();
    assert_eq!(config["Entrypoint"][0], "docker-entrypoint.sh", "{config}");
    assert_eq!(config["Cmd"][0], "mongod", "{config}");
    let port = chat_rig::free_port().expect("a free port");
    let dbpath = format!("/tmp/db-{port}");
    let _server = container.spawn(
        &[
            ("MONGO_INITDB_ROOT_USERNAME", "chat"),
            ("MONGO_INITDB_ROOT_PASSWORD", "s3cret"),
        ],
        &[
            "docker-entrypoint.sh",
            "mongod",
            "--port",
            &port.to_string(),
            "--dbpath",
            &dbpath,
        ],
    );
    // The operator's readiness probe, in the image.
    let probe = wait_for(
        || {
            let out = container.run(&[
                "mongosh",
                "--quiet",
                "--port",
                &port.to_string(),
                "--eval",
                "db.adminCommand('ping').ok",
            ]);
            out.status.success().then_some(out)
        },
        "the mongosh probe",
    );
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "1");
    // The official driver logs in with the root user (SCRAM) and writes and reads a document.
    let uri = format!("mongodb://chat:s3cret@127.0.0.1:{port}/?authSource=admin");
    let client = mongodb::Client::with_uri_str(&uri).await.expect("client");
    let collection = client
        .database("stand_in")
        .collection::<mongodb::bson::Document>("turns");
    collection
        .insert_one(mongodb::bson::doc! {"turn": 1})
        .await
        .expect("insert with the root user's SCRAM login");
    let found = collection
        .find_one(mongodb::bson::doc! {"turn": 1})
        .await
        .expect("find");
    assert!(found.is_some());
    // A wrong password is refused.
    let wrong = format!("mongodb://chat:wrong@127.0.0.1:{port}/?authSource=admin");
    let client = mongodb::Client::with_uri_str(&wrong).await.expect("client");
    let refused = client
        .database("stand_in")
        .collection::<mongodb::bson::Document>("turns")
        .insert_one(mongodb::bson::doc! {"turn": 2})
        .await;
    assert!(refused.is_err(), "a wrong password was accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn stand_in_ollama_pulls_from_its_own_store_and_serves() {
    let archives = stand_ins_archives();
    let container = Container::from_archive(&archives, stand_ins::OLLAMA_IMAGE);
    let models = format!("/tmp/models-{}", chat_rig::unique_name("pull"));
    let env = [("OLLAMA_MODELS", models.as_str()), ("HOME", "/tmp")];
    let pull = container
        .run_cmd(&env, &["ollama", "pull", chat_rig::MODEL, "smollm2:135m"])
        .output()
        .expect("ollama pull");
    assert!(pull.status.success(), "pull: {}", text(&pull));
    let missing = container
        .run_cmd(&env, &["ollama", "pull", "llama3:70b"])
        .output()
        .expect("ollama pull");
    assert!(!missing.status.success(), "pulled a model the image lacks");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("not in this image's model store"),
        "{}",
        text(&missing)
    );
    let port = chat_rig::free_port().expect("a free port");
    let host = format!("127.0.0.1:{port}");
    let serve_env = [
        ("OLLAMA_MODELS", models.as_str()),
        ("HOME", "/tmp"),
        ("OLLAMA_HOST", host.as_str()),
    ];
    let _server = container.spawn(&serve_env, &["/bin/ollama", "serve"]);
    let tags_url = format!("http://{host}/api/tags");
    let deadline = Instant::now() + Duration::from_secs(60);
    let tags = loop {
        if let Ok(response) = reqwest::get(&tags_url).await
            && let Ok(body) = response.text().await
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the stand-in ollama did not answer within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for model in [chat_rig::MODEL, "smollm2:135m"] {
        assert!(tags.contains(model), "{model} not served: {tags}");
    }
}

#[test]
fn coredns_and_metrics_server_images_run_their_binary() {
    let archives = stand_ins_archives();
    for (image, argv) in [
        (stand_ins::COREDNS_IMAGE, ["/coredns", "-version"]),
        (
            stand_ins::METRICS_SERVER_IMAGE,
            ["/metrics-server", "--version"],
        ),
    ] {
        let container = Container::from_archive(&archives, image);
        assert_eq!(container.config()["User"], "65532:65532");
        let out = container.run(&argv);
        assert!(out.status.success(), "{image}: {}", text(&out));
    }
}

/// Built once per test process: the tests share them.
fn stand_ins_archives() -> Archives {
    static ARCHIVES: std::sync::OnceLock<Archives> = std::sync::OnceLock::new();
    ARCHIVES
        .get_or_init(|| {
            let standin = Path::new(env!("CARGO_BIN_EXE_mongo-standin"));
            let started = Instant::now();
            let archives = stand_ins::stand_in_images(standin)
                .unwrap_or_else(|e| panic!("building the stand-in images: {e:#}"));
            eprintln!(
                "stand-in images in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            archives
        })
        .clone()
}

fn wait_for<T>(mut probe: impl FnMut() -> Option<T>, what: &str) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not answer within 60 s"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A private containerd (its own root, state and socket in a scratch folder; CRI off), stopped
/// and cleaned on drop.
struct PrivateContainerd {
    dir: std::path::PathBuf,
    process: Child,
}

impl PrivateContainerd {
    fn start() -> PrivateContainerd {
        let dir = chat_rig::scratch_dir("containerd").expect("a scratch folder");
        let config = format!(
            "version = 3\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.images\", \"io.containerd.cri.v1.runtime\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
             [debug]\n  address = \"{d}/debug.sock\"\n[metrics]\n  address = \"\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).expect("writing containerd's config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("containerd's log");
        let bin = chat_rig::paths::cached_bin("containerd").expect("containerd");
        let process = Command::new(&bin)
            .arg("--config")
            .arg(dir.join("config.toml"))
            // ctr run finds the shim and runc on PATH.
            .env("PATH", path_with_cached_bins())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let containerd = PrivateContainerd { dir, process };
        wait_for(
            || containerd.ctr(&["version"]).status.success().then_some(()),
            "the private containerd",
        );
        containerd
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.join("containerd.sock")
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new(chat_rig::paths::cached_bin("ctr").expect("ctr"))
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io"])
            .args(args)
            .env("PATH", path_with_cached_bins())
            .output()
            .expect("running ctr")
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(self.dir.join("root"));
    }
}

fn path_with_cached_bins() -> String {
    format!(
        "{}:{}",
        chat_rig::paths::cache_dir().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn archives_import_into_containerd_and_run_there() {
    let archives = images::product_images(&product_binaries()).expect("building the images");
    let containerd = PrivateContainerd::start();
    let ctr = chat_rig::paths::cached_bin("ctr").expect("ctr");
    images::import(&ctr, &containerd.socket(), &archives).expect("importing the archives");
    // runc runs the entrypoint of the imported image.
    let version = containerd.ctr(&[
        "run",
        "--rm",
        images::CHAT_SERVICE_IMAGE,
        "chat-service-version",
        "/usr/local/bin/chat-service",
        "--version",
    ]);
    assert!(version.status.success(), "ctr run: {}", text(&version));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        concat!("chat-service ", env!("CARGO_PKG_VERSION"))
    );
    let shell = containerd.ctr(&[
        "run",
        "--rm",
        images::CHAT_SERVICE_IMAGE,
        "no-shell",
        "/bin/sh",
    ]);
    assert!(!shell.status.success(), "a shell ran: {}", text(&shell));
    assert!(
        String::from_utf8_lossy(&shell.stderr).contains("/bin/sh: no such file"),
        "{}",
        text(&shell)
    );
}
