//! A certificate authority of its own for the stores' TLS listeners, made with openssl per run:
//! a CA and one serving certificate for 127.0.0.1 and `localhost`, so clients can verify the
//! server for real (the same check a chat pod makes against ElastiCache or DocumentDB).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::control_plane::openssl;
use crate::servers::{FerretDb, FerretTls, RedisServer};

/// The rig's own throwaway credentials of the TLS stores.
pub const REDIS_TLS_PASSWORD: &str = "rig-redis-auth-token";
pub const MONGODB_TLS_USER: &str = "chat";
pub const MONGODB_TLS_PASSWORD: &str = "rig-mongodb-password";

/// A CA, a TLS-only redis-server with AUTH and a TLS-only FerretDB with a user, in one folder:
/// what ElastiCache with in-transit encryption and DocumentDB look like to a client.
pub struct TlsStores {
    pub ca: StoreCa,
    pub redis: RedisServer,
    pub mongodb: FerretDb,
}

impl TlsStores {
    pub fn start(dir: &Path) -> Result<Self> {
        let ca = StoreCa::create(&dir.join("ca"), "chat-operator-rig-store-ca")?;
        let redis = RedisServer::start_tls(&dir.join("redis"), REDIS_TLS_PASSWORD, &ca)?;
        let mongodb = FerretDb::start_tls(
            &dir.join("ferretdb"),
            FerretTls {
                ca: ca.clone(),
                database: "chat".into(),
                username: MONGODB_TLS_USER.into(),
                password: MONGODB_TLS_PASSWORD.into(),
            },
        )?;
        Ok(Self { ca, redis, mongodb })
    }
}

/// A CA and the serving certificate it signed, as PEM files in one folder.
#[derive(Debug, Clone)]
pub struct StoreCa {
    /// The CA certificate clients trust (what a CA Secret holds).
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl StoreCa {
    /// Creates `<dir>/ca.crt` (CN `cn`) and a serving pair `server.crt`/`server.key` for
    /// 127.0.0.1 and `localhost`.
    pub fn create(dir: &Path, cn: &str) -> Result<Self> {
        Self::create_for(dir, cn, &["IP:127.0.0.1", "DNS:localhost"])
    }

    /// Like [`StoreCa::create`], with the serving certificate's subject alternative names
    /// `sans` (`DNS:redis.ns.svc.cluster.local`, `IP:10.0.0.1`), e.g. for stores that run as
    /// pods behind a Service name.
    pub fn create_for(dir: &Path, cn: &str, sans: &[&str]) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let subject = format!("/CN={cn}");
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.crt", "-days", "3650"]);
        ca.extend(["-subj", &subject]);
        openssl(dir, &ca)?;
        fs::write(
            dir.join("server.ext"),
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )?;
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", "server.key", "-out", "server.csr"]);
        req.extend(["-subj", "/CN=localhost"]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "3650",
                "-extfile",
                "server.ext",
            ],
        )?;
        Ok(Self {
            ca_file: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        })
    }
}
