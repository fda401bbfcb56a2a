//! The `sitecore-auth-proxy` command line: parse arguments, set up logging, run, map exit codes.

use std::io::Read;
#[cfg(feature = "emulator")]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sha2::Digest;
use sitecore_auth_proxy::app::{self, Options};
use sitecore_auth_proxy::config::Config;
use sitecore_auth_proxy::error::ErrorChain;
use sitecore_auth_proxy::server::Workers;

/// Exit code for an invalid configuration (EX_USAGE, as linkerd does).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "sitecore-auth-proxy",
    version,
    about = "An authenticating reverse proxy for Sitecore's cloud APIs"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "SITECORE_PROXY_CONFIG",
        default_value = "proxy.toml"
    )]
    config: PathBuf,
    /// Log output format.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the route table.
    Check {
        /// Also obtain and verify one token per credential (prints expiry and scopes, never the token).
        #[arg(long)]
        fetch: bool,
    },
    /// Run the built-in Sitecore emulator and the proxy wired to it.
    #[cfg(feature = "emulator")]
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the admin listener (status page, metrics) listens; default: a free loopback
        /// port.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Read an inbound API key on stdin and print its SHA-256 for `key_sha256`.
    HashKey,
    /// Exit 0 when the admin /healthz answers 200 (container health checks).
    Healthcheck {
        /// Admin base URL.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Flushes the log when main returns.
    let _log_guard = init_logging(cli.log_format);
    // Every subcommand that speaks TLS (run, check --fetch, healthcheck) needs the provider.
    sitecore_auth_proxy::install_crypto_providers();
    // Admin, signals, token refreshers and the emulator run here; the proxy listener gets its
    // own worker threads (`app::start`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run(&cli.config).await,
            Command::Check { fetch } => check(&cli.config, fetch).await,
            #[cfg(feature = "emulator")]
            Command::Demo { listen, admin } => demo(listen, admin).await,
            Command::HashKey => hash_key(),
            Command::Healthcheck { admin } => healthcheck(&admin).await,
        }
    })
}

fn init_logging(format: LogFormat) -> sitecore_auth_proxy::logging::LogGuard {
    use sitecore_auth_proxy::logging;
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let format = match format {
        LogFormat::Text => logging::Format::Text,
        LogFormat::Json => logging::Format::Json,
    };
    logging::init_stderr(format, &directives)
}

/// `SITECORE_PROXY_WORKERS`: how many worker threads serve the proxy listener (default: one
/// per available core).
fn workers_from_env() -> Result<Workers, String> {
    const VAR: &str = "SITECORE_PROXY_WORKERS";
    match std::env::var(VAR) {
        Err(_) => Ok(Workers::default()),
        Ok(text) => text
            .trim()
            .parse::<std::num::NonZeroUsize>()
            .ok()
            .filter(|n| n.get() <= 1024)
            .map(Workers::Threads)
            .ok_or_else(|| {
                format!("{VAR}: expected a number of threads from 1 to 1024, got {text:?}")
            }),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

async fn run(path: &std::path::Path) -> ExitCode {
    let options = match workers_from_env() {
        Ok(workers) => Options {
            workers,
            ..Options::default()
        },
        Err(problem) => {
            eprintln!("{problem}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let proxy = match app::start(config, options).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", ErrorChain(&e));
            return ExitCode::FAILURE;
        }
    };
    let mut signals = Signals::new();
    while let Signal::Reload = signals.next().await {
        tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
        if let Err(e) = proxy.reload_from(path).await {
            for line in e.to_string().lines() {
                tracing::error!(
                    problem = line,
                    "reload refused; the previous configuration keeps serving"
                );
            }
        }
    }
    tracing::info!("shutdown requested; draining");
    proxy.shutdown();
    proxy.wait().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

enum Signal {
    Reload,
    Stop,
}

/// SIGHUP (reload) and SIGTERM/SIGINT (stop), registered once so none is missed between waits.
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::hangup()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(hup), Ok(term)) => Some((hup, term)),
                _ => None,
            };
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        if let Some((hup, term)) = &mut self.streams {
            return tokio::select! {
                _ = hup.recv() => Signal::Reload,
                _ = term.recv() => Signal::Stop,
                _ = tokio::signal::ctrl_c() => Signal::Stop,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        Signal::Stop
    }
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn check(path: &std::path::Path, fetch: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match sitecore_auth_proxy::check::run(config, fetch, &mut std::io::stdout()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("check: {}", ErrorChain(&*e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "emulator")]
async fn demo(listen: SocketAddr, admin: Option<SocketAddr>) -> ExitCode {
    use sitecore_auth_proxy::demo::{self, DEFAULT_ADMIN};
    let demo = match demo::start(listen, admin.unwrap_or(DEFAULT_ADMIN)).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demo: {}", ErrorChain(&e));
            return ExitCode::FAILURE;
        }
    };
    println!();
    println!("sitecore-auth-proxy demo: the proxy and the built-in Sitecore emulator are running.");
    println!("  proxy            http://{}", demo.proxy.local_addr());
    println!(
        "  token endpoint   {}  (emulated; the proxy holds the secret)",
        demo.emulator.token_url()
    );
    for (prefix, api) in demo::ROUTES {
        println!("  route {prefix:<18} -> {}", demo.emulator.api_base(api));
    }
    println!(
        "  status page      {}  (open in a browser)",
        demo.status_page_url()
    );
    println!("  metrics          {}", demo.metrics_url());
    println!();
    println!("Try these (no token needed; the proxy injects one):");
    for command in demo.curl_commands() {
        println!("  {command}");
    }
    println!("Then watch them on the status page, or:");
    println!("  curl -s {}", demo.status_page_url());
    println!("  curl -s {}", demo.metrics_url());
    println!();
    println!("Press Ctrl-C to stop.");
    wait_for_stop_signal().await;
    demo.proxy.shutdown();
    demo.proxy.wait().await;
    ExitCode::SUCCESS
}

fn hash_key() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("cannot read the key from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let key = input.strip_suffix('\n').unwrap_or(&input);
    let key = key.strip_suffix('\r').unwrap_or(key);
    if key.is_empty() {
        eprintln!("no key on stdin; usage: printf %s \"$KEY\" | sitecore-auth-proxy hash-key");
        return ExitCode::FAILURE;
    }
    println!("{}", hex::encode(sha2::Sha256::digest(key.as_bytes())));
    ExitCode::SUCCESS
}

async fn healthcheck(admin: &str) -> ExitCode {
    let url = format!("{}/healthz", admin.trim_end_matches('/'));
    let client = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("healthcheck: {url} answered {}", r.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck: {url}: {}", ErrorChain(&e.without_url()));
            ExitCode::FAILURE
        }
    }
}
