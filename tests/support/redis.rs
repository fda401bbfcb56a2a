//! A real `redis-server` (the Debian package) for the fleet tests: started in the foreground on a
//! free loopback port without persistence (a restart comes back empty, as a Redis without a
//! volume does), optionally with a password or TLS, and driven through the faults a fleet must
//! survive: killed, frozen (SIGSTOP) and thawed, restarted.
//!
//! The binary is `/usr/bin/redis-server` (`.ci/run` installs it). Without it a test is skipped
//! with a note, except under CI (`CI` set), where its absence fails the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;
use super::tls::{temp_dir, write, TestCa};

/// Where the Debian package puts the binary.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run the server.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `requirepass`: clients must authenticate.
    pub password: Option<String>,
    /// Serve TLS only, with a certificate for 127.0.0.1 issued by this CA's PEM files (cert,
    /// key, CA).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// A running redis-server. Dropping it kills the process and removes its directory.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    options: RedisOptions,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one with default options; `None` (after a note) when it is not installed and this
    /// is not CI: the calling test returns early.
    pub async fn start() -> Option<RedisServer> {
        RedisServer::start_with(RedisOptions::default()).await
    }

    /// Starts one with `options`; `None` as for [`RedisServer::start`].
    pub async fn start_with(options: RedisOptions) -> Option<RedisServer> {
        if !installed() {
            return None;
        }
        let mut last_error = String::new();
        // A free port may be taken between finding and binding it: retry on a fresh one.
        for _ in 0..3 {
            let mut server = RedisServer {
                port: free_port(),
                dir: temp_dir("redis"),
                options: options.clone(),
                child: None,
            };
            match server.spawn().await {
                Ok(()) => return Some(server),
                Err(error) => last_error = error,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// A port nothing listens on yet, and the directory a server started later on it will use:
    /// "Redis absent at start". `None` as for [`RedisServer::start`].
    pub fn absent() -> Option<RedisServer> {
        if !installed() {
            return None;
        }
        Some(RedisServer {
            port: free_port(),
            dir: temp_dir("redis"),
            options: RedisOptions::default(),
            child: None,
        })
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL a replica is configured with (`rediss://` with TLS; the password when set).
    pub fn url(&self) -> String {
        self.url_with_password(self.options.password.as_deref())
    }

    /// The URL with another password (or none).
    pub fn url_with_password(&self, password: Option<&str>) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("{scheme}://127.0.0.1:{}/0", self.port),
        }
    }

    /// A client for the test's own look at the data (plain connections only).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("test connects to redis")
    }

    /// Kills the process (SIGKILL, as a crash would) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port: empty, as nothing is persisted.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(error) = self.spawn().await {
            panic!("redis-server did not start on port {}: {error}", self.port);
        }
    }

    /// SIGSTOP: the port still accepts connections, nothing answers.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new(REDIS_SERVER);
        command
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"));
        match &self.options.tls {
            Some((cert, key, ca)) => {
                command
                    .arg("--port")
                    .arg("0")
                    .arg("--tls-port")
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca)
                    .arg("--tls-auth-clients")
                    .arg("no");
            }
            None => {
                command.arg("--port").arg(self.port.to_string());
            }
        }
        if let Some(password) = &self.options.password {
            command.arg("--requirepass").arg(password);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{REDIS_SERVER}: {e}"))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log =
                        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                    return Err(format!("exited with {status}: {log}"));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill();
                return Err(format!("port {} did not open within 10 s", self.port));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A frozen server ignores SIGKILL only until it is continued; continue it first.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// TLS material for a `rediss://` server in `dir`: (cert, key, CA) paths, and the CA.
pub fn tls_files(dir: &Path) -> ((PathBuf, PathBuf, PathBuf), TestCa) {
    let ca = TestCa::new("redis test CA");
    let issued = ca.server();
    let cert = write(dir, "redis.crt", &issued.cert_pem);
    let key = write(dir, "redis.key", &issued.key_pem);
    let ca_file = write(dir, "ca.pem", &ca.pem());
    ((cert, key, ca_file), ca)
}

fn installed() -> bool {
    if Path::new(REDIS_SERVER).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{REDIS_SERVER} is missing: the fleet tests need the redis-server package \
             (.ci/run installs it)"
        );
    }
    eprintln!(
        "note: {REDIS_SERVER} is missing, so this fleet test is skipped; install the \
         redis-server package to run it"
    );
    false
}
