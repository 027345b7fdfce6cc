//! `hopper`: the command-line client of the Hopper broker — flags, dispatch and error reporting.
//!
//! Each subcommand lives in its own module and owns its flags; all table and JSON rendering
//! lives in [`output`].

mod access;
mod audit;
mod bench;
mod bench_watch;
mod cluster;
mod consume;
mod events;
mod exchange;
mod get;
mod moves;
mod output;
mod publish;
mod queue;
mod shutdown;
mod status;
mod time;
mod top;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use hopper_client::{
    ClientCertificate, ConnectOptions, Connection, Credentials, Recovering, RecoveryOptions, TlsOptions,
};

/// Exit status of a process ended by SIGPIPE, used when stdout is closed under us.
const BROKEN_PIPE_EXIT: u8 = 141;

/// Publish, consume, inspect and benchmark a Hopper broker.
#[derive(Debug, Parser)]
#[command(name = "hopper", version, propagate_version = true)]
struct Cli {
    /// Broker address, HOST:PORT, or hopper://USER:PASSWORD@HOST:PORT; hoppers://... (or
    /// hoppers://HOST:PORT) connects with TLS to the broker's --tls-listen port. Several,
    /// comma-separated, are tried in order (a comma in a password is written %2C).
    #[arg(long, global = true, env = "HOPPER_SERVER", default_value = "127.0.0.1:5680", display_order = 100)]
    server: String,
    /// User to log in as (SCRAM-SHA-256: the password never crosses the wire). Without one,
    /// the broker's built-in guest, which works from the broker's own host until an admin
    /// user exists.
    #[arg(long, global = true, env = "HOPPER_USER", display_order = 101)]
    user: Option<String>,
    /// The user's password.
    #[arg(long, global = true, env = "HOPPER_PASSWORD", hide_env_values = true, display_order = 102)]
    password: Option<String>,
    /// PEM file of the CA that signed the broker's certificate, trusted instead of the built-in
    /// roots (with hoppers:// only).
    #[arg(long, global = true, value_name = "FILE", env = "HOPPER_TLS_CA", display_order = 103)]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --tls-key). Without --user, logs in as the
    /// certificate's user (mechanism EXTERNAL).
    #[arg(long, global = true, value_name = "FILE", env = "HOPPER_TLS_CERT", display_order = 104)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, value_name = "FILE", env = "HOPPER_TLS_KEY", display_order = 105)]
    tls_key: Option<PathBuf>,
    /// Name the broker's certificate must be valid for [default: the host of --server].
    #[arg(long, global = true, value_name = "NAME", env = "HOPPER_TLS_SERVER_NAME", display_order = 106)]
    tls_server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Declare, delete, purge, list, inspect and peek into queues; set alarms; move messages.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Declare, list and delete exchanges.
    #[command(subcommand)]
    Exchange(exchange::ExchangeCommand),
    /// Bind a queue (or, with --exchange, an exchange) to an exchange.
    Bind(exchange::BindArgs),
    /// Remove a binding.
    Unbind(exchange::BindArgs),
    /// List bindings.
    Bindings(exchange::BindingsArgs),
    /// Publish messages to a queue (or through an exchange) and wait for the broker to confirm
    /// every one.
    Publish(publish::PublishArgs),
    /// Print the messages of a queue and acknowledge, requeue, reject or hold them.
    Consume(consume::ConsumeArgs),
    /// Pull messages from a queue once (optionally waiting for one), print and settle them.
    Get(get::GetArgs),
    /// Print the audit trail of dead messages: where and why they died, where they went.
    Audit(audit::AuditArgs),
    /// Show the broker's health: uptime, connections, flow control, memory and disk.
    Status(status::StatusArgs),
    /// Inspect the cluster the broker belongs to.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Print the broker's events (alarms, publisher blocks, moves) as they happen.
    Events(events::EventsArgs),
    /// Watch the queues live: depths, consumers, rates per second and alarms.
    Top(top::TopArgs),
    /// Measure throughput and end-to-end latency with concurrent producers and consumers.
    Bench(bench::BenchArgs),
    /// Add, delete, list users and change passwords (admin).
    #[command(subcommand)]
    User(access::UserCommand),
    /// Set and list what users may do (admin).
    #[command(subcommand)]
    Permissions(access::PermissionsCommand),
    /// Show who you are logged in as and what you may do.
    Whoami(access::JsonArgs),
    /// Create, list and delete your API tokens (HTTP `Authorization: Bearer`).
    #[command(subcommand)]
    Token(access::TokenCommand),
}

/// The user and password given with --user/--password or their environment variables.
static CREDENTIALS: OnceLock<Option<Credentials>> = OnceLock::new();

/// The TLS files and name given with --tls-* or their environment variables, read once.
static TLS: OnceLock<TlsFlags> = OnceLock::new();

/// What the --tls-* flags say, with the files' contents.
#[derive(Debug, Default)]
struct TlsFlags {
    ca: Option<Vec<u8>>,
    client: Option<ClientCertificate>,
    server_name: Option<String>,
    /// The flags given, for the error when --server is not hoppers://.
    given: Vec<&'static str>,
}

impl TlsFlags {
    fn load(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        server_name: Option<String>,
    ) -> anyhow::Result<TlsFlags> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| anyhow!("cannot read {flag} {}: {}", path.display(), io_reason(&e)))
        };
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some(ClientCertificate {
                cert_pem: read("--tls-cert", &cert)?,
                key_pem: read("--tls-key", &key)?,
            }),
            (None, None) => None,
            (Some(_), None) => {
                anyhow::bail!("--tls-cert (or HOPPER_TLS_CERT) needs --tls-key (or HOPPER_TLS_KEY)")
            }
            (None, Some(_)) => {
                anyhow::bail!("--tls-key (or HOPPER_TLS_KEY) needs --tls-cert (or HOPPER_TLS_CERT)")
            }
        };
        let given = [
            ("--tls-ca", ca.is_some()),
            ("--tls-cert", client.is_some()),
            ("--tls-server-name", server_name.is_some()),
        ];
        Ok(TlsFlags {
            ca: ca.map(|path| read("--tls-ca", &path)).transpose()?,
            client,
            server_name,
            given: given.into_iter().filter(|(_, set)| *set).map(|(flag, _)| flag).collect(),
        })
    }

    /// TLS options for a connection to `address` (HOST:PORT).
    fn options(&self, address: &str) -> TlsOptions {
        TlsOptions {
            server_name: self.server_name.clone().unwrap_or_else(|| host_of(address).to_owned()),
            ca_certificates: self.ca.clone(),
            client_certificate: self.client.clone(),
        }
    }
}

/// `hopper bench` and `hopper consume` allocate per delivery; jemalloc keeps that cheap on
/// the cores the broker shares.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("hopper: error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Tasks still blocked on stdin must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::from(BROKEN_PIPE_EXIT),
        Err(err) => {
            eprintln!("hopper: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the chosen subcommand.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let credentials = match (cli.user, cli.password) {
        (Some(user), password) => Some(Credentials::new(user, password.unwrap_or_default())),
        (None, Some(_)) => anyhow::bail!("--password (or HOPPER_PASSWORD) needs --user (or HOPPER_USER)"),
        (None, None) => None,
    };
    let _ = CREDENTIALS.set(credentials);
    let _ = TLS.set(TlsFlags::load(cli.tls_ca, cli.tls_cert, cli.tls_key, cli.tls_server_name)?);
    match cli.command {
        Command::Queue(command) => queue::run(&cli.server, command).await,
        Command::Exchange(command) => exchange::run(&cli.server, command).await,
        Command::Bind(args) => exchange::run_bind(&cli.server, args, false).await,
        Command::Unbind(args) => exchange::run_bind(&cli.server, args, true).await,
        Command::Bindings(args) => exchange::run_bindings(&cli.server, args).await,
        Command::Publish(args) => publish::run(&cli.server, args).await,
        Command::Consume(args) => consume::run(&cli.server, args).await,
        Command::Get(args) => get::run(&cli.server, args).await,
        Command::Audit(args) => audit::run(&cli.server, args).await,
        Command::Status(args) => status::run(&cli.server, args).await,
        Command::Cluster(command) => cluster::run(&cli.server, command).await,
        Command::Events(args) => events::run(&cli.server, args).await,
        Command::Top(args) => top::run(&cli.server, args).await,
        Command::Bench(args) => bench::run(&cli.server, args).await,
        Command::User(command) => access::run_user(&cli.server, command).await,
        Command::Permissions(command) => access::run_permissions(&cli.server, command).await,
        Command::Whoami(args) => access::run_whoami(&cli.server, args).await,
        Command::Token(command) => access::run_token(&cli.server, command).await,
    }
}

/// Connects to the broker, turning a failure into one readable line such as
/// `cannot connect to 127.0.0.1:5680: Connection refused`. `--server` may name several brokers,
/// comma-separated: they are tried in order and the first that answers is used. A refused
/// login ends the search (the next broker of a cluster would refuse it too).
pub(crate) async fn connect(servers: &str, role: &str) -> anyhow::Result<Connection> {
    let servers: Vec<&str> = servers.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let [first, rest @ ..] = servers.as_slice() else {
        anyhow::bail!("--server names no broker");
    };
    if rest.is_empty() {
        return connect_one(first, role).await.map_err(|failure| failure.error);
    }
    let mut failures = Vec::with_capacity(servers.len());
    for server in &servers {
        match connect_one(server, role).await {
            Ok(connection) => return Ok(connection),
            Err(failure) if failure.is_final => return Err(failure.error),
            Err(failure) => failures.push(failure.error.to_string()),
        }
    }
    anyhow::bail!("no broker could be reached: {}", failures.join("; "))
}

/// A connection for a command that runs until stopped (`consume`) to the brokers `servers`
/// names (comma-separated, one cluster): it replaces itself when its broker goes away and
/// follows a replicated queue to the node serving it. The brokers share one login (the first
/// URL's, or --user) and one TLS setup; with several `hoppers://` brokers the certificate is
/// checked against --tls-server-name, or the first broker's host.
pub(crate) async fn connect_recovering(servers: &str, role: &str) -> anyhow::Result<Recovering> {
    let servers: Vec<Server> = servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_server)
        .collect::<Result<_, _>>()?;
    let Some(first) = servers.first() else {
        anyhow::bail!("--server names no broker");
    };
    if servers.iter().any(|server| server.tls != first.tls) {
        anyhow::bail!("--server mixes hopper:// and hoppers:// brokers; the brokers of a cluster share one");
    }
    let flags = TLS.get_or_init(TlsFlags::default);
    if !first.tls && !flags.given.is_empty() {
        anyhow::bail!(
            "{} given, but --server is plain TCP: TLS is chosen with hoppers://HOST:PORT",
            flags.given.join(", ")
        );
    }
    let options = ConnectOptions {
        client_name: format!("hopper-cli/{} {role}", env!("CARGO_PKG_VERSION")),
        credentials: first.credentials.clone().or_else(|| CREDENTIALS.get().cloned().flatten()),
        tls: first.tls.then(|| flags.options(&first.address)),
        ..ConnectOptions::default()
    };
    let addrs: Vec<String> = servers.iter().map(|server| server.address.clone()).collect();
    Recovering::connect(addrs, options, RecoveryOptions::default()).await.map_err(|err| match err {
        hopper_client::Error::Unreachable(reasons) => anyhow!("no broker could be reached: {reasons}"),
        other => anyhow!("cannot connect: {other}"),
    })
}

/// Why one broker could not be connected to, and whether trying the next one is pointless.
struct ConnectFailure {
    error: anyhow::Error,
    is_final: bool,
}

impl ConnectFailure {
    fn of(error: anyhow::Error) -> Self {
        ConnectFailure { error, is_final: true }
    }
}

async fn connect_one(server: &str, role: &str) -> Result<Connection, ConnectFailure> {
    let Server { address, credentials, tls } = parse_server(server).map_err(ConnectFailure::of)?;
    let server = address.as_str();
    let flags = TLS.get_or_init(TlsFlags::default);
    if !tls && !flags.given.is_empty() {
        return Err(ConnectFailure::of(anyhow!(
            "{} given, but --server {server} is plain TCP: TLS is chosen with hoppers://HOST:PORT",
            flags.given.join(", ")
        )));
    }
    let options = ConnectOptions {
        client_name: format!("hopper-cli/{} {role}", env!("CARGO_PKG_VERSION")),
        credentials: credentials.or_else(|| CREDENTIALS.get().cloned().flatten()),
        tls: tls.then(|| flags.options(server)),
        ..ConnectOptions::default()
    };
    Connection::connect_with(server, options).await.map_err(|err| {
        let is_final = matches!(
            err,
            hopper_client::Error::Authentication(_) | hopper_client::Error::HandshakeRejected { .. }
        );
        let error = match err {
            hopper_client::Error::Io(io) => {
                let hint = match io.to_string().contains("not signed by a CA this client trusts") {
                    true if flags.ca.is_none() => " (give the broker's CA with --tls-ca FILE)",
                    _ => "",
                };
                anyhow!("cannot connect to {server}: {}{hint}", io_reason(&io))
            }
            other => anyhow!("cannot connect to {server}: {other}"),
        };
        ConnectFailure { error, is_final }
    })
}

/// Where `--server` points, and how to get there.
#[derive(Debug, PartialEq, Eq)]
struct Server {
    /// HOST:PORT.
    address: String,
    /// The user and password of a URL that has them.
    credentials: Option<Credentials>,
    /// `hoppers://`: the connection runs inside TLS.
    tls: bool,
}

/// Splits `--server` into the address and, for a `hopper://user:password@host:port` URL, the
/// credentials in it (percent-encoded where they hold `:`, `@` or `/`). `hoppers://` is the
/// same with TLS.
fn parse_server(server: &str) -> anyhow::Result<Server> {
    let (rest, tls) = match (server.strip_prefix("hopper://"), server.strip_prefix("hoppers://")) {
        (Some(rest), _) => (rest, false),
        (None, Some(rest)) => (rest, true),
        (None, None) => return Ok(Server { address: server.to_owned(), credentials: None, tls: false }),
    };
    let rest = rest.trim_end_matches('/');
    let Some((userinfo, address)) = rest.rsplit_once('@') else {
        return Ok(Server { address: rest.to_owned(), credentials: None, tls });
    };
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map(|t| t.into_owned())
            .map_err(|_| anyhow!("the user or password in '{server}' is not valid UTF-8 once decoded"))
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    if address.is_empty() {
        let scheme = if tls { "hoppers" } else { "hopper" };
        anyhow::bail!("'{server}' names no host: use {scheme}://USER:PASSWORD@HOST:PORT");
    }
    let credentials = Some(Credentials::new(decode(user)?, decode(password)?));
    Ok(Server { address: address.to_owned(), credentials, tls })
}

/// The host of HOST:PORT (`[::1]:5681` gives `::1`), which the broker's certificate must name.
fn host_of(address: &str) -> &str {
    if let Some(bracketed) = address.strip_prefix('[') {
        return bracketed.split_once(']').map_or(bracketed, |(host, _)| host);
    }
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

/// A flag value parser for whole numbers no smaller than `min`, with a readable error.
pub(crate) fn at_least<T>(min: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |text| match text.parse::<T>() {
        Ok(value) if value >= min => Ok(value),
        Ok(_) => Err(format!("must be at least {min}")),
        Err(_) => Err(format!("expected a whole number, got '{text}'")),
    }
}

/// The operating system's text for an I/O error without the trailing `(os error N)`.
fn io_reason(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// Whether the error chain ends in a write to a closed pipe (e.g. `hopper consume q | head`).
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn io_reason_drops_the_os_error_number() {
        let err = std::io::Error::from_raw_os_error(111);
        let reason = io_reason(&err);
        assert!(!reason.contains("os error"), "{reason}");
        let custom = std::io::Error::other("plain");
        assert_eq!(io_reason(&custom), "plain");
    }

    #[test]
    fn broken_pipe_is_recognised_through_context() {
        let err = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&err));
        assert!(!is_broken_pipe(&anyhow!("other")));
    }

    #[test]
    fn at_least_rejects_small_and_malformed_numbers() {
        let parse = at_least(16u64);
        assert_eq!(parse("16"), Ok(16));
        assert_eq!(parse("8"), Err("must be at least 16".to_string()));
        assert!(parse("-1").unwrap_err().contains("whole number"));
        assert!(parse("x").unwrap_err().contains("whole number"));
    }

    #[test]
    fn hopper_and_hoppers_urls() {
        let plain = parse_server("hopper://app:p%40ss@mq.internal:5680/").unwrap();
        assert_eq!(
            plain,
            Server {
                address: "mq.internal:5680".into(),
                credentials: Some(Credentials::new("app", "p@ss")),
                tls: false
            }
        );
        let tls = parse_server("hoppers://app:pw@mq.internal:5681").unwrap();
        assert_eq!((tls.address.as_str(), tls.tls), ("mq.internal:5681", true));
        assert_eq!(tls.credentials, Some(Credentials::new("app", "pw")));
        let bare = parse_server("hoppers://127.0.0.1:5681").unwrap();
        assert_eq!((bare.address.as_str(), bare.credentials, bare.tls), ("127.0.0.1:5681", None, true));
        assert!(!parse_server("127.0.0.1:5680").unwrap().tls);
        let error = parse_server("hoppers://app:pw@").unwrap_err().to_string();
        assert!(error.contains("hoppers://USER:PASSWORD@HOST:PORT"), "{error}");
    }

    #[test]
    fn the_server_name_is_the_host() {
        assert_eq!(host_of("mq.internal:5681"), "mq.internal");
        assert_eq!(host_of("127.0.0.1:5681"), "127.0.0.1");
        assert_eq!(host_of("[::1]:5681"), "::1");
        assert_eq!(host_of("mq.internal"), "mq.internal");
    }

    #[test]
    fn server_defaults_and_is_global() {
        let cli = Cli::try_parse_from(["hopper", "queue", "list", "--server", "h:1"]).unwrap();
        assert_eq!(cli.server, "h:1");
    }
}
