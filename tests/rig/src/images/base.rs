//! The distroless-like runtime base, and the image layers the stand-ins add on it, assembled from
//! Debian packages: `apt-get download` (cached under `~/.cache/chat-operator/images/debs`),
//! `dpkg-deb -x` into a folder, then `buildah from` + `buildah add` of that folder as a tar (which
//! keeps owners and modes) + `buildah commit`. Nothing here runs a package's maintainer scripts,
//! so what they would generate (the CA bundle, `ld.so.cache`, users) is written here.
//!
//! The base holds what `gcr.io/distroless/cc-debian12:nonroot` holds for a Rust binary: glibc,
//! libgcc, CA certificates, tzdata, netbase, `/etc/passwd` with root, nobody and nonroot (65532),
//! `/tmp`, and no shell; its user is 65532:65532.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{
    RECIPE_VERSION, buildah_from, cache_key, commit, image_exists, remove_container, run, work_dir,
};

/// The Debian packages of the base.
pub const BASE_PACKAGES: &[&str] = &["libc6", "libgcc-s1", "ca-certificates", "tzdata", "netbase"];
/// UID and GID of the base's user (distroless `nonroot`).
pub const NONROOT: u32 = 65532;

/// A user an image's `/etc/passwd` and `/etc/group` define.
#[derive(Debug, Clone, Copy)]
pub struct User {
    pub name: &'static str,
    pub id: u32,
    pub home: &'static str,
}

const BASE_USERS: &[User] = &[
    User {
        name: "root",
        id: 0,
        home: "/root",
    },
    User {
        name: "nobody",
        id: 65534,
        home: "/nonexistent",
    },
    User {
        name: "nonroot",
        id: NONROOT,
        home: "/home/nonroot",
    },
];

/// The image config a layer gets (what a Dockerfile's USER, ENV, ENTRYPOINT... would set).
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    pub user: Option<String>,
    pub env: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub workdir: Option<String>,
    pub ports: Vec<u16>,
}

/// The base image's name in buildah's store, built first when the store lacks it.
pub fn runtime_base() -> Result<String> {
    runtime_base_of(&candidate_versions(BASE_PACKAGES)?)
}

/// [`runtime_base`] with the packages' versions looked up already (`versions` may hold more).
pub fn runtime_base_of(all_versions: &BTreeMap<String, String>) -> Result<String> {
    let versions: BTreeMap<String, String> = BASE_PACKAGES
        .iter()
        .map(|p| {
            all_versions
                .get(*p)
                .map(|v| (p.to_string(), v.clone()))
                .with_context(|| format!("no version of the base's package {p} was looked up"))
        })
        .collect::<Result<_>>()?;
    let key = cache_key(&[
        RECIPE_VERSION.as_bytes(),
        b"runtime-base",
        format!("{versions:?}").as_bytes(),
    ])?;
    let image = format!("localhost/chatop/runtime-base:{key}");
    if image_exists(&image) {
        return Ok(image);
    }
    let work = work_dir("runtime-base")?;
    let root = work.join("root");
    extract_packages(&versions, &root)?;
    finish_root(&root, &[])?;
    let config = ImageConfig {
        user: Some(format!("{NONROOT}:{NONROOT}")),
        env: vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            (
                "SSL_CERT_FILE".into(),
                "/etc/ssl/certs/ca-certificates.crt".into(),
            ),
        ],
        workdir: Some("/home/nonroot".into()),
        ..Default::default()
    };
    let result = layer_image("scratch", &root, &config, &image);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(image)
}

/// Commits `from` + the folder `root` (as one layer) + `config` as `image` in buildah's store.
pub fn layer_image(from: &str, root: &Path, config: &ImageConfig, image: &str) -> Result<()> {
    let tar = root.with_extension("tar");
    run(
        Command::new("tar")
            .arg("-C")
            .arg(root)
            .args(["--numeric-owner", "-cf"])
            .arg(&tar)
            .arg("."),
        &format!("packing {}", root.display()),
    )?;
    let container = buildah_from(from)?;
    let result = (|| {
        run(
            Command::new("buildah")
                .args(["add", "-q", &container])
                .arg(&tar)
                .arg("/"),
            &format!("adding the layer of {image}"),
        )?;
        let mut cmd = Command::new("buildah");
        cmd.arg("config");
        if let Some(user) = &config.user {
            cmd.args(["--user", user]);
        }
        for (name, value) in &config.env {
            cmd.args(["--env", &format!("{name}={value}")]);
        }
        if !config.entrypoint.is_empty() {
            cmd.args(["--entrypoint", &serde_json::to_string(&config.entrypoint)?]);
        }
        if !config.cmd.is_empty() {
            cmd.args(["--cmd", &serde_json::to_string(&config.cmd)?]);
        }
        if let Some(dir) = &config.workdir {
            cmd.args(["--workingdir", dir]);
        }
        for port in &config.ports {
            cmd.args(["--port", &format!("{port}/tcp")]);
        }
        cmd.arg(&container);
        run(&mut cmd, &format!("configuring {image}"))?;
        commit(&container, image)
    })();
    remove_container(&container);
    let _ = std::fs::remove_file(&tar);
    result
}

/// Package → the version `apt-get download` fetches (the candidate), from apt's local lists.
pub fn candidate_versions(packages: &[&str]) -> Result<BTreeMap<String, String>> {
    if packages.is_empty() {
        return Ok(BTreeMap::new());
    }
    let out = run(
        Command::new("apt-cache")
            .args(["show", "--no-all-versions"])
            .args(packages),
        "looking up Debian package versions (apt's lists missing? run `apt-get update`)",
    )?;
    let mut versions = BTreeMap::new();
    let mut package = None;
    for line in out.lines() {
        if let Some(p) = line.strip_prefix("Package: ") {
            package = Some(p.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Version: ")
            && let Some(p) = package.take()
        {
            versions.insert(p, v.trim().to_string());
        }
    }
    for p in packages {
        if !versions.contains_key(*p) {
            bail!("apt-cache knows no version of the Debian package {p}");
        }
    }
    Ok(versions)
}

/// Downloads (once) and unpacks each package=version into `root`.
pub fn extract_packages(versions: &BTreeMap<String, String>, root: &Path) -> Result<()> {
    std::fs::create_dir_all(root)?;
    for (package, version) in versions {
        let deb = download(package, version)?;
        run(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root),
            &format!("unpacking {}", deb.display()),
        )?;
    }
    Ok(())
}

/// The cached `.deb` of package=version, downloaded when missing.
fn download(package: &str, version: &str) -> Result<PathBuf> {
    let dir = crate::paths::cache_dir().join("images/debs");
    std::fs::create_dir_all(&dir)?;
    let find = || -> Option<PathBuf> {
        // apt-get names the file package_version_arch.deb, with ':' in the version as %3a.
        let prefix = format!("{package}_{}_", version.replace(':', "%3a"));
        std::fs::read_dir(&dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with(&prefix) && name.ends_with(".deb")).then(|| e.path())
        })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    // Tests build images in parallel, and apt-get writes the .deb where it runs while it
    // downloads: another build finding a half-written file in the cache would unpack it
    // ("unexpected end of file in archive member header"). So each download goes to a folder of
    // its own and is renamed into the cache only once complete (rename is atomic; two builds
    // renaming the same package leave one whole file).
    let partial = partial_dir(&dir, package)?;
    let downloaded = run(
        Command::new("apt-get")
            .args(["download", "-q", &format!("{package}={version}")])
            .current_dir(&partial),
        &format!("downloading the Debian package {package}={version}"),
    )
    .and_then(|_| {
        for entry in std::fs::read_dir(&partial)?.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".deb") {
                std::fs::rename(entry.path(), dir.join(name))?;
            }
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&partial);
    downloaded?;
    find().with_context(|| {
        format!(
            "apt-get download {package}={version} left no .deb in {}",
            dir.display()
        )
    })
}

/// A new, empty folder under `dir` for one download of `package` (a dot name, so that
/// [`download`]'s search of `dir` never looks inside).
fn partial_dir(dir: &Path, package: &str) -> Result<PathBuf> {
    let partial = dir.join(format!(".partial-{}", crate::unique_name(package)));
    std::fs::create_dir(&partial).with_context(|| format!("creating {}", partial.display()))?;
    Ok(partial)
}

/// What maintainer scripts and distroless add: users, the CA bundle, `ld.so.cache`, `/tmp` and
/// the home folders. `extra_users` are added to the base's.
pub fn finish_root(root: &Path, extra_users: &[User]) -> Result<()> {
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("ssl/certs"))?;
    let mut passwd = String::new();
    let mut group = String::new();
    for user in BASE_USERS.iter().chain(extra_users) {
        passwd.push_str(&format!(
            "{0}:x:{1}:{1}:{0}:{2}:/sbin/nologin\n",
            user.name, user.id, user.home
        ));
        group.push_str(&format!("{}:x:{}:\n", user.name, user.id));
    }
    std::fs::write(etc.join("passwd"), passwd)?;
    std::fs::write(etc.join("group"), group)?;
    // update-ca-certificates would write this bundle from the package's certificates.
    let mozilla = root.join("usr/share/ca-certificates/mozilla");
    if mozilla.is_dir() {
        let mut certs: Vec<PathBuf> = std::fs::read_dir(&mozilla)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        certs.sort();
        let mut bundle = Vec::new();
        for cert in certs {
            bundle.extend(std::fs::read(cert)?);
        }
        std::fs::write(etc.join("ssl/certs/ca-certificates.crt"), bundle)?;
    }
    std::fs::write(etc.join("ld.so.conf"), "include /etc/ld.so.conf.d/*.conf\n")?;
    run(
        Command::new("ldconfig").arg("-r").arg(root),
        "writing the image's ld.so.cache",
    )?;
    use std::os::unix::fs::{PermissionsExt, chown};
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    for user in BASE_USERS.iter().chain(extra_users) {
        if user.id != 0 && user.home.starts_with("/home/") {
            let home = root.join(user.home.trim_start_matches('/'));
            std::fs::create_dir_all(&home)?;
            chown(&home, Some(user.id), Some(user.id))?;
        }
    }
    Ok(())
}

/// The Debian packages that hold the shared libraries `binaries` load (per `ldd`), except the
/// base's: what an image needs besides the base to run them.
pub fn library_packages(binaries: &[&Path]) -> Result<Vec<String>> {
    let mut libraries = std::collections::BTreeSet::new();
    for binary in binaries {
        let out = run(
            Command::new("ldd").arg(binary),
            &format!("listing the libraries of {}", binary.display()),
        )?;
        libraries.extend(out.lines().filter_map(|line| {
            line.split("=>")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        }));
    }
    // One dpkg call for all (each costs a read of dpkg's database), with every library both as
    // `/lib/...` and, merged-/usr, as `/usr/lib/...`: dpkg knows each by one of the two.
    let alternate = |path: &str| match path.strip_prefix("/usr") {
        Some(rest) => rest.to_string(),
        None => format!("/usr{path}"),
    };
    let queries: Vec<String> = libraries
        .iter()
        .flat_map(|l| [l.clone(), alternate(l)])
        .collect();
    let out = Command::new("dpkg")
        .arg("-S")
        .args(&queries)
        .output()
        .context("running dpkg -S")?;
    // Lines are `package[:arch]: path`; dpkg exits 1 for the variants it does not know.
    let owners: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (packages, path) = line.split_once(": ")?;
            let package = packages.split(", ").next()?.split(':').next()?;
            Some((path.trim().to_string(), package.to_string()))
        })
        .collect();
    let mut packages = std::collections::BTreeSet::new();
    for library in &libraries {
        let owner = owners
            .get(library)
            .or_else(|| owners.get(&alternate(library)))
            .with_context(|| format!("no installed Debian package ships {library}"))?;
        packages.insert(owner.clone());
    }
    for base in BASE_PACKAGES {
        packages.remove(*base);
    }
    Ok(packages.into_iter().collect())
}
