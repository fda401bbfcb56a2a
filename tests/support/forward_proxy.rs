//! A real forward proxy for the egress tests: `tinyproxy` (the Debian package), started in the
//! foreground on a free loopback port with a generated configuration, and its log, which shows
//! every request it received (`CONNECT host:port` for a tunnel, `GET http://host:port/path` for
//! a request in absolute form).
//!
//! What tinyproxy 1.11 does, as these tests rely on it (checked against 1.11.1):
//! - with no `ConnectPort` line, `CONNECT` to any port is allowed (the upstream sample
//!   configuration lists 443 and 563; Debian's packaged one lists none);
//!   [`ProxyOptions::connect_ports`] restricts it, and a `CONNECT` to another port is answered
//!   403;
//! - with a `BasicAuth` line, a request without `Proxy-Authorization` is answered 407, one with
//!   wrong credentials 401; either is still logged as a `Request` line, without an `Established
//!   connection` after it;
//! - each request is logged at level `Connect` as `Request (file descriptor N): <request line>`,
//!   before the proxy connects onwards; a connection that sends nothing (the start-up probe)
//!   shows as a `Connect` line and a `read_request_line` error;
//! - a request in absolute form is answered and then the connection is closed, without a
//!   `Connection: close` (the upstream's HTTP/1.1 head is relayed as it came), so a client that
//!   pools it races the close; a `CONNECT` tunnel stays open until either side closes it or
//!   `Timeout` passes;
//! - it restarts on the same port right after a SIGKILL.
//!
//! The binary is `/usr/bin/tinyproxy` (`.ci/run` installs it). Without it a test is skipped with a
//! note, except under CI (`CI` set), where its absence fails the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;
use super::tls::temp_dir;

/// Where the Debian package puts the binary.
pub const TINYPROXY: &str = "/usr/bin/tinyproxy";

/// How long a start may take before the test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How to configure the forward proxy.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// `BasicAuth user password`: every request must carry these credentials (407 otherwise).
    pub basic_auth: Option<(String, String)>,
    /// `ConnectPort` lines; empty: `CONNECT` to any port.
    pub connect_ports: Vec<u16>,
}

/// A request line from the proxy's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedRequest {
    /// `CONNECT`, `GET`, `POST`, ...
    pub method: String,
    /// `host:port` for `CONNECT`, the absolute URL otherwise.
    pub target: String,
}

impl ProxiedRequest {
    /// The port the request was for (the target's explicit port).
    pub fn port(&self) -> Option<u16> {
        let authority = match self.target.split_once("://") {
            Some((_, rest)) => rest.split(['/', '?']).next().unwrap_or_default(),
            None => self.target.as_str(),
        };
        authority.rsplit_once(':')?.1.parse().ok()
    }

    /// Whether this is a `CONNECT` tunnel request.
    pub fn is_connect(&self) -> bool {
        self.method == "CONNECT"
    }
}

/// A running tinyproxy. Dropping it kills the process and removes its directory.
#[derive(Debug)]
pub struct ForwardProxy {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl ForwardProxy {
    /// Starts tinyproxy with the default options; `None` (after a note) when it is not installed
    /// and this is not CI: the calling test returns early.
    pub async fn start() -> Option<ForwardProxy> {
        ForwardProxy::start_with(ProxyOptions::default()).await
    }

    /// Starts tinyproxy with `options`; `None` as for [`ForwardProxy::start`].
    pub async fn start_with(options: ProxyOptions) -> Option<ForwardProxy> {
        if !installed() {
            return None;
        }
        // The free port is found by binding and releasing it; another process may take it in
        // between, so a start that fails is retried on a fresh port.
        let mut last_error = String::new();
        for _ in 0..3 {
            let dir = temp_dir("tinyproxy");
            let port = free_port();
            std::fs::write(dir.join("tinyproxy.conf"), config(&dir, port, &options))
                .expect("write tinyproxy.conf");
            let mut proxy = ForwardProxy {
                port,
                dir,
                child: None,
            };
            match proxy.spawn().await {
                Ok(()) => return Some(proxy),
                Err(error) => last_error = error,
            }
        }
        panic!("tinyproxy did not start: {last_error}");
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`: how the proxy names it in errors and in `check`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://user:password@127.0.0.1:<port>`.
    pub fn url_with(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// The whole log so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tinyproxy.log")).unwrap_or_default()
    }

    /// Every request the proxy received, in order (across restarts).
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.log()
            .lines()
            .filter_map(|line| {
                let (_, rest) = line.split_once("]: Request (file descriptor ")?;
                let (_, request_line) = rest.split_once("): ")?;
                let mut words = request_line.split_whitespace();
                Some(ProxiedRequest {
                    method: words.next()?.to_owned(),
                    target: words.next()?.to_owned(),
                })
            })
            .collect()
    }

    /// The requests for `port`.
    pub fn requests_to(&self, port: u16) -> Vec<ProxiedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.port() == Some(port))
            .collect()
    }

    /// How many `CONNECT` tunnels to `port` were asked for.
    pub fn connects_to(&self, port: u16) -> usize {
        self.requests_to(port)
            .iter()
            .filter(|r| r.is_connect())
            .count()
    }

    /// Kills the process (SIGKILL, as a crash would) and waits for it: its listener and every
    /// tunnel through it close.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same configuration, appending to the same log.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(error) = self.spawn().await {
            panic!("tinyproxy did not restart on port {}: {error}", self.port);
        }
    }

    /// Runs `tinyproxy -d -c <conf>` and waits until its port accepts connections.
    async fn spawn(&mut self) -> Result<(), String> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stderr.txt"))
            .map_err(|e| format!("stderr file: {e}"))?;
        let child = Command::new(TINYPROXY)
            .arg("-d")
            .arg("-c")
            .arg(self.dir.join("tinyproxy.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{TINYPROXY}: {e}"))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            // A probe connection shows in the log as a `Connect` line with no `Request`.
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "exited ({status}) on port {}; stderr:\n{}\nlog:\n{}",
                    self.port,
                    std::fs::read_to_string(self.dir.join("stderr.txt")).unwrap_or_default(),
                    self.log()
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "port {} not accepting after {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the binary is there; panics under CI when it is not.
fn installed() -> bool {
    if Path::new(TINYPROXY).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{TINYPROXY} is missing: the egress tests need the tinyproxy package \
             (.ci/run installs it)"
        );
    }
    eprintln!(
        "note: {TINYPROXY} is missing, so this egress test is skipped; \
         install the tinyproxy package to run it"
    );
    false
}

/// The configuration file.
fn config(dir: &Path, port: u16, options: &ProxyOptions) -> String {
    let mut text = format!(
        "Port {port}\n\
         Listen 127.0.0.1\n\
         Allow 127.0.0.1\n\
         Timeout 30\n\
         LogLevel Info\n\
         LogFile \"{}\"\n\
         MaxClients 100\n\
         DisableViaHeader Yes\n",
        dir.join("tinyproxy.log").display()
    );
    for port in &options.connect_ports {
        text.push_str(&format!("ConnectPort {port}\n"));
    }
    if let Some((user, password)) = &options.basic_auth {
        text.push_str(&format!("BasicAuth {user} {password}\n"));
    }
    text
}
