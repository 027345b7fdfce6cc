//! `hopperd`: flags, configuration layering and logging setup around [`hopper_broker::Broker`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hopper_broker::storage::FsyncPolicy;
use hopper_broker::{Broker, Config};

/// The Hopper message broker.
#[derive(Debug, Parser)]
#[command(name = "hopperd", version, about)]
struct Args {
    /// TOML configuration file; flags and HOPPER_* variables override its values.
    #[arg(long, env = "HOPPER_CONFIG")]
    config: Option<PathBuf>,
    /// Address for the binary protocol, or "off" to accept only TLS connections
    /// [default: 127.0.0.1:5680; port 0 picks a free port].
    #[arg(long, env = "HOPPER_LISTEN")]
    listen: Option<String>,
    /// Address of a second listener speaking the binary protocol inside TLS (needs --tls-cert
    /// and --tls-key) [default: off].
    #[arg(long, value_name = "ADDR", env = "HOPPER_TLS_LISTEN")]
    tls_listen: Option<String>,
    /// Address of a listener speaking AMQP 0-9-1, for RabbitMQ's clients (127.0.0.1:5672, say)
    /// [default: off].
    #[arg(long, value_name = "ADDR", env = "HOPPER_AMQP_LISTEN")]
    amqp_listen: Option<String>,
    /// Address of a listener speaking AMQP 0-9-1 inside TLS (127.0.0.1:5671, say; needs
    /// --tls-cert and --tls-key) [default: off].
    #[arg(long, value_name = "ADDR", env = "HOPPER_AMQPS_LISTEN")]
    amqps_listen: Option<String>,
    /// PEM file with the certificate chain of the TLS listener and of HTTPS (--http-tls), the
    /// broker's own certificate first.
    #[arg(long, value_name = "FILE", env = "HOPPER_TLS_SERVER_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert.
    #[arg(long, value_name = "FILE", env = "HOPPER_TLS_SERVER_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM file of the CAs that client certificates must chain to: the TLS listener then
    /// refuses clients without such a certificate (mutual TLS), and a client can log in as
    /// its certificate's subject CN with the EXTERNAL mechanism. HTTPS asks for none.
    #[arg(long, value_name = "FILE", env = "HOPPER_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Data directory [default: ./hopper-data].
    #[arg(long, env = "HOPPER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Heartbeat interval proposed to clients, in milliseconds (0 = none) [default: 10000].
    #[arg(long, env = "HOPPER_HEARTBEAT_MS")]
    heartbeat_ms: Option<u32>,
    /// Largest frame accepted or sent, in bytes [default: 16777216].
    #[arg(long, env = "HOPPER_MAX_FRAME_SIZE")]
    max_frame_size: Option<u32>,
    /// Most simultaneous connections [default: 10000].
    #[arg(long, env = "HOPPER_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Most simultaneous connections of one user [default: 10000].
    #[arg(long, env = "HOPPER_MAX_CONNECTIONS_PER_USER")]
    max_connections_per_user: Option<usize>,
    /// Most push consumers on one connection [default: 10000].
    #[arg(long, env = "HOPPER_MAX_CONSUMERS_PER_CONNECTION")]
    max_consumers_per_connection: Option<usize>,
    /// Most queues in the broker [default: 100000].
    #[arg(long, env = "HOPPER_MAX_QUEUES")]
    max_queues: Option<usize>,
    /// Most publishes of one connection in flight (accepted, not yet confirmed)
    /// [default: 100000].
    #[arg(long, env = "HOPPER_MAX_UNCONFIRMED_PER_CONNECTION")]
    max_unconfirmed_per_connection: Option<usize>,
    /// When durable publishes are flushed: always (before the confirm), batch or never
    /// [default: always].
    #[arg(long, env = "HOPPER_FSYNC")]
    fsync: Option<FsyncPolicy>,
    /// Flush period for --fsync batch, in milliseconds [default: 100].
    #[arg(long, env = "HOPPER_FSYNC_INTERVAL_MS")]
    fsync_interval_ms: Option<u64>,
    /// Size of a durable queue's log segment, in bytes [default: 33554432].
    #[arg(long, env = "HOPPER_SEGMENT_BYTES")]
    segment_bytes: Option<u64>,
    /// Body bytes each durable queue keeps in memory [default: 67108864].
    #[arg(long, env = "HOPPER_QUEUE_MEMORY_BYTES")]
    queue_memory_bytes: Option<usize>,
    /// Storage threads serving every durable queue, each writing one shared log [default: the
    /// number of cores, at most 16].
    #[arg(long, env = "HOPPER_STORAGE_THREADS")]
    storage_threads: Option<usize>,
    /// Segment files kept open for reading stored bodies, over all logs [default: 256].
    #[arg(long, env = "HOPPER_MAX_OPEN_SEGMENTS")]
    max_open_segments: Option<usize>,
    /// Message bytes in memory above which publishers are blocked [default: 40% of RAM].
    #[arg(long, env = "HOPPER_MEMORY_HIGH_WATERMARK")]
    memory_high_watermark: Option<u64>,
    /// Free disk bytes below which publishers are blocked [default: 52428800].
    #[arg(long, env = "HOPPER_DISK_FREE_LOW_WATERMARK")]
    disk_free_low_watermark: Option<u64>,
    /// HTTP listener for metrics, the JSON API and the dashboard, or "off"
    /// [default: 127.0.0.1:15680; port 0 picks a free port].
    #[arg(long, env = "HOPPER_HTTP")]
    http: Option<String>,
    /// Serve HTTPS instead of HTTP on --http, with --tls-cert and --tls-key (--tls-listen is
    /// not needed); --http-tls=false turns it off again [default: false].
    #[arg(
        long,
        value_name = "BOOL",
        env = "HOPPER_HTTP_TLS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    http_tls: Option<bool>,
    /// A host name the HTTP listener answers to besides IP addresses and localhost, in any
    /// case, on any port; repeat the flag for more (the variable takes a comma-separated
    /// list). Requests by other names are refused: this defeats DNS rebinding.
    #[arg(
        long = "http-allow-host",
        value_name = "NAME",
        env = "HOPPER_HTTP_ALLOW_HOST",
        value_delimiter = ','
    )]
    http_allow_host: Vec<String>,
    /// An origin (scheme://host[:port]) besides the listener's own whose web pages may call
    /// the HTTP API; repeat the flag for more (the variable takes a comma-separated list).
    #[arg(
        long = "http-allow-origin",
        value_name = "ORIGIN",
        env = "HOPPER_HTTP_ALLOW_ORIGIN",
        value_delimiter = ','
    )]
    http_allow_origin: Vec<String>,
    /// http:// URL that queue depth alarms are POSTed to as JSON.
    #[arg(long, env = "HOPPER_ALARM_WEBHOOK")]
    alarm_webhook: Option<String>,
    /// This node's id in a cluster (1 or more); with --peers and --cluster-listen it joins
    /// the cluster [default: not in a cluster].
    #[arg(long, value_name = "N", env = "HOPPER_NODE_ID")]
    node_id: Option<u64>,
    /// Address other nodes of the cluster reach this one at [default: 127.0.0.1:5690].
    #[arg(long, value_name = "ADDR", env = "HOPPER_CLUSTER_LISTEN")]
    cluster_listen: Option<String>,
    /// The initial cluster, this node included, as ID=ADDR pairs of cluster addresses:
    /// 1=10.0.0.1:5690,2=10.0.0.2:5690,3=10.0.0.3:5690. Every node is started with the same
    /// list; the cluster forms once a majority runs.
    #[arg(long, value_name = "LIST", env = "HOPPER_PEERS")]
    peers: Option<String>,
    /// The address clients reach this node at, which the cluster sends them to for what this
    /// node serves; set it when --listen is a wildcard such as 0.0.0.0 [default: the
    /// address --listen bound].
    #[arg(long, value_name = "ADDR", env = "HOPPER_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Metadata log entries between two snapshots of the cluster's metadata; the log before a
    /// snapshot is dropped [default: 5000].
    #[arg(long, value_name = "N", env = "HOPPER_CLUSTER_SNAPSHOT_ENTRIES")]
    cluster_snapshot_entries: Option<u64>,
    /// Raft groups the replicated queues are spread over, each led by its own node; the same on
    /// every node, and never changed once the cluster holds replicated queues [default: 3].
    #[arg(long, value_name = "N", env = "HOPPER_QUEUE_GROUPS")]
    queue_groups: Option<usize>,
    /// Milliseconds a write to a client may make no progress before the client is
    /// disconnected [default: 30000].
    #[arg(long, env = "HOPPER_WRITE_TIMEOUT_MS")]
    write_timeout_ms: Option<u64>,
}

impl Args {
    fn into_config(self) -> Result<Config, hopper_broker::StartError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(amqp_listen) = self.amqp_listen {
            config.amqp_listen = amqp_listen;
        }
        if let Some(amqps_listen) = self.amqps_listen {
            config.amqps_listen = amqps_listen;
        }
        if let Some(tls_listen) = self.tls_listen {
            config.tls_listen = tls_listen;
        }
        if let Some(path) = self.tls_cert {
            config.tls_cert = Some(path);
        }
        if let Some(path) = self.tls_key {
            config.tls_key = Some(path);
        }
        if let Some(path) = self.tls_client_ca {
            config.tls_client_ca = Some(path);
        }
        if let Some(data_dir) = self.data_dir {
            config.data_dir = data_dir;
        }
        if let Some(heartbeat_ms) = self.heartbeat_ms {
            config.heartbeat_ms = heartbeat_ms;
        }
        if let Some(max_frame_size) = self.max_frame_size {
            config.max_frame_size = max_frame_size;
        }
        if let Some(write_timeout_ms) = self.write_timeout_ms {
            config.write_timeout_ms = write_timeout_ms;
        }
        if let Some(max_connections) = self.max_connections {
            config.max_connections = max_connections;
        }
        if let Some(limit) = self.max_connections_per_user {
            config.max_connections_per_user = limit;
        }
        if let Some(limit) = self.max_consumers_per_connection {
            config.max_consumers_per_connection = limit;
        }
        if let Some(limit) = self.max_queues {
            config.max_queues = limit;
        }
        if let Some(limit) = self.max_unconfirmed_per_connection {
            config.max_unconfirmed_per_connection = limit;
        }
        if let Some(fsync) = self.fsync {
            config.fsync = fsync;
        }
        if let Some(fsync_interval_ms) = self.fsync_interval_ms {
            config.fsync_interval_ms = fsync_interval_ms;
        }
        if let Some(segment_bytes) = self.segment_bytes {
            config.segment_bytes = segment_bytes;
        }
        if let Some(queue_memory_bytes) = self.queue_memory_bytes {
            config.queue_memory_bytes = queue_memory_bytes;
        }
        if let Some(threads) = self.storage_threads {
            config.storage_threads = threads;
        }
        if let Some(files) = self.max_open_segments {
            config.max_open_segments = files;
        }
        if let Some(bytes) = self.memory_high_watermark {
            config.memory_high_watermark_bytes = bytes;
        }
        if let Some(bytes) = self.disk_free_low_watermark {
            config.disk_free_low_watermark_bytes = bytes;
        }
        if let Some(http) = self.http {
            config.http = http;
        }
        if let Some(http_tls) = self.http_tls {
            config.http_tls = http_tls;
        }
        // Given at all, a list replaces the file's, as any other flag does.
        if !self.http_allow_host.is_empty() {
            config.http_allow_hosts = self.http_allow_host;
        }
        if !self.http_allow_origin.is_empty() {
            config.http_allow_origins = self.http_allow_origin;
        }
        if let Some(node_id) = self.node_id {
            config.node_id = node_id;
        }
        if let Some(addr) = self.cluster_listen {
            config.cluster_listen = addr;
        }
        if let Some(peers) = self.peers {
            config.peers = peers;
        }
        if let Some(addr) = self.advertise_addr {
            config.advertise_addr = addr;
        }
        if let Some(entries) = self.cluster_snapshot_entries {
            config.cluster_snapshot_entries = entries;
        }
        if let Some(groups) = self.queue_groups {
            config.queue_groups = groups;
        }
        if let Some(url) = self.alarm_webhook {
            config.alarm_webhook = Some(url);
        }
        Ok(config)
    }
}

/// jemalloc, with its background threads, gives freed memory back to the system within seconds,
/// so the broker's RSS follows the messages it holds; glibc's allocator kept most of a drained
/// backlog's memory for good.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Threads for blocking work beside the runtime's workers and the storage threads.
const BLOCKING_THREADS: usize = 32;
/// How long an idle blocking thread stays.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Starts `count` threads that wait for each other and end: fails if the machine cannot run
/// that many more threads now.
fn try_threads(count: usize) -> std::io::Result<()> {
    let release = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let mut started = Vec::with_capacity(count);
    let mut outcome = Ok(());
    for _ in 0..count {
        let release = release.clone();
        let spawned = std::thread::Builder::new().stack_size(64 * 1024).spawn(move || {
            let (done, wake) = &*release;
            let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
            while !*done {
                done = wake.wait(done).unwrap_or_else(|e| e.into_inner());
            }
        });
        match spawned {
            Ok(handle) => started.push(handle),
            Err(err) => {
                outcome = Err(err);
                break;
            }
        }
    }
    *release.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    release.1.notify_all();
    for handle in started {
        let _ = handle.join();
    }
    outcome
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOPPER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match args.into_config() {
        Ok(config) => config,
        Err(err) => return fail(&err.to_string()),
    };
    // A runtime that cannot start all its workers hangs rather than failing, so the threads the
    // broker starts with are tried first.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    if let Err(err) = try_threads(workers + config.storage_threads + 2) {
        return fail(&format!(
            "cannot start: no thread to run on ({err}); the machine is out of threads or memory"
        ));
    }
    // Blocking work (metadata fsyncs of declares and deletes, audit reads) waits for one of a
    // bounded set of threads rather than growing the process by a thread per request. They
    // stay once started: while one is alive, blocking work that finds the machine out of
    // threads waits for it instead of failing.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the runtime: {err}")),
    };
    runtime.block_on(async {
        ignore_file_size_signal();
        // Raised before recovery opens every durable queue's files; logged once the broker
        // started, so a startup error stays one line.
        let file_limit = raise_open_file_limit();
        let data_dir = config.data_dir.display().to_string();
        let http_scheme = if config.http_tls { "https" } else { "http" };
        let broker = match Broker::start(config).await {
            Ok(broker) => broker,
            Err(err) => return fail(&err.to_string()),
        };
        // Handlers are installed before the address is announced, so a SIGTERM sent as soon as
        // the broker says it listens already shuts it down gracefully.
        let shutdown = shutdown_signal();
        file_limit.log();
        if let Some(http) = broker.http_addr() {
            tracing::info!("{http_scheme} listening on {http} (dashboard at {http_scheme}://{http}/)");
        }
        if let Some(amqp) = broker.amqp_addr() {
            tracing::info!("amqp listening on {amqp}");
        }
        if let Some(amqps) = broker.amqps_addr() {
            tracing::info!("amqps listening on {amqps}");
        }
        // The plain listener's line comes last: tests and scripts take it as "ready". With the
        // plain listener off, the TLS line carries the data directory and version instead.
        let version = env!("CARGO_PKG_VERSION");
        match (broker.tls_addr(), broker.plain_addr()) {
            (Some(tls), Some(_)) => tracing::info!("tls listening on {tls}"),
            (Some(tls), None) => tracing::info!(data_dir = %data_dir, version, "tls listening on {tls}"),
            (None, _) => {}
        }
        if let Some(addr) = broker.plain_addr() {
            tracing::info!(data_dir = %data_dir, version, "listening on {addr}");
        }
        shutdown.await;
        tracing::info!("shutting down");
        broker.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// One clear line and exit code 1: startup errors are the operator's to fix, not bugs.
fn fail(message: &str) -> ExitCode {
    eprintln!("hopperd: error: {message}");
    ExitCode::FAILURE
}

/// A write past the file-size limit (RLIMIT_FSIZE) raises SIGXFSZ, whose default action kills
/// the process. Handling it turns the write into an ordinary EFBIG error, which the broker
/// reports as a refused publish like any other full disk.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        const SIGXFSZ: i32 = 25;
        if let Ok(mut xfsz) = signal(SignalKind::from_raw(SIGXFSZ)) {
            tokio::spawn(async move {
                while xfsz.recv().await.is_some() {
                    tracing::debug!("file size limit reached");
                }
            });
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every connection and every segment
/// being read takes a descriptor, and the usual soft default (1024) is far below what a busy
/// broker needs, while the hard limit is the operator's real ceiling.
fn raise_open_file_limit() -> FileLimit {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((was, hard)) => FileLimit { was, hard, raised: rlimit::increase_nofile_limit(hard) },
        Err(err) => FileLimit { was: 0, hard: 0, raised: Err(err) },
    }
}

/// What [`raise_open_file_limit`] found and did.
struct FileLimit {
    was: u64,
    hard: u64,
    raised: std::io::Result<u64>,
}

impl FileLimit {
    fn log(&self) {
        match &self.raised {
            Ok(soft) => tracing::info!(soft, hard = self.hard, was = self.was, "open file limit"),
            Err(err) => {
                tracing::warn!(soft = self.was, hard = self.hard, error = %err, "cannot raise the open file limit")
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = ctrl_c.await;
    }
}
