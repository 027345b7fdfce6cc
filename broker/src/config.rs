//! Broker configuration: defaults, the TOML file, and validation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::StartError;
use crate::storage::{FsyncPolicy, StorageConfig};

/// Everything the broker needs to start. Field names are also the TOML file's keys.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on for the binary protocol; port 0 picks a free one; "off" disables
    /// the plain listener (then `tls_listen` must be set).
    pub listen: String,
    /// Address of a second listener speaking the same protocol inside TLS; "off" (the
    /// default) disables it. Needs `tls_cert` and `tls_key`.
    pub tls_listen: String,
    /// PEM file with the TLS listener's certificate chain, its own certificate first; HTTPS
    /// (`http_tls`) serves the same one.
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// PEM file of the CAs that client certificates must chain to. Set, the TLS listener
    /// requires a client certificate (mutual TLS) and offers the EXTERNAL login. HTTPS does not
    /// ask for client certificates: HTTP requests log in with Basic auth or a token.
    pub tls_client_ca: Option<PathBuf>,
    /// Directory for the broker's files.
    pub data_dir: PathBuf,
    /// Largest frame the broker accepts or sends, in bytes.
    pub max_frame_size: u32,
    /// Heartbeat interval the broker proposes, in milliseconds (0 = none). The client's
    /// smaller non-zero value wins; a client asking for 0 gets none.
    pub heartbeat_ms: u32,
    /// Most simultaneous client connections.
    pub max_connections: usize,
    /// Most simultaneous connections of one user.
    pub max_connections_per_user: usize,
    /// Most push consumers on one connection.
    pub max_consumers_per_connection: usize,
    /// Most queues in the broker.
    pub max_queues: usize,
    /// Most publishes of one connection accepted and not confirmed yet.
    pub max_unconfirmed_per_connection: usize,
    /// How long a new connection may take to complete the handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// How long a write to a client may make no progress before the client, which is then not
    /// reading, is disconnected (its unacked deliveries go back), in milliseconds.
    pub write_timeout_ms: u64,
    /// When durable queues flush to disk relative to the publish confirm.
    pub fsync: FsyncPolicy,
    /// Flush period for `fsync = "batch"`, in milliseconds.
    pub fsync_interval_ms: u64,
    /// Size at which a durable queue's log segment is closed, in bytes.
    pub segment_bytes: u64,
    /// Bytes of message bodies each durable queue keeps in memory; the rest stay on disk.
    pub queue_memory_bytes: usize,
    /// Storage threads serving every durable queue, each writing one shared log (default: the
    /// number of cores).
    pub storage_threads: usize,
    /// Segment files kept open for reading stored bodies, over all logs.
    pub max_open_segments: usize,
    /// Message bytes held in memory above which publishers are blocked (default: 40% of RAM).
    pub memory_high_watermark_bytes: u64,
    /// Free disk bytes below which publishers are blocked.
    pub disk_free_low_watermark_bytes: u64,
    /// Address of the HTTP listener (metrics, API, dashboard); "off" disables it.
    pub http: String,
    /// Address of the AMQP 0-9-1 listener; "off" (the default) disables it.
    pub amqp_listen: String,
    /// Address of the AMQP 0-9-1 listener inside TLS (AMQPS), with `tls_cert` and `tls_key`;
    /// "off" (the default) disables it.
    pub amqps_listen: String,
    /// Makes the HTTP listener speak HTTPS, with `tls_cert` and `tls_key`.
    pub http_tls: bool,
    /// Host names the HTTP listener answers to besides IP addresses and `localhost` (matched
    /// against the `Host` header in any case, any port). Requests for other names are refused,
    /// which defeats DNS rebinding.
    pub http_allow_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) besides the listener's own whose web pages may call the
    /// HTTP API.
    pub http_allow_origins: Vec<String>,
    /// `http://` URL that depth alarms are POSTed to.
    pub alarm_webhook: Option<String>,
    /// This node's id in a cluster (1 or more); 0 = not in a cluster.
    pub node_id: u64,
    /// Address other nodes of the cluster reach this one at.
    pub cluster_listen: String,
    /// The initial cluster, this node included: `1=host:port,2=host:port,...` (cluster
    /// addresses).
    pub peers: String,
    /// The address clients reach this node at; empty = the address the client listener
    /// bound.
    pub advertise_addr: String,
    /// Metadata log entries between two snapshots of the cluster's metadata.
    pub cluster_snapshot_entries: u64,
    /// Queue groups replicated queues are spread over (the same on every node).
    pub queue_groups: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:5680".into(),
            tls_listen: "off".into(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            data_dir: PathBuf::from("./hopper-data"),
            max_frame_size: hopper_proto::DEFAULT_MAX_FRAME_SIZE,
            heartbeat_ms: 10_000,
            max_connections: 10_000,
            max_connections_per_user: 10_000,
            max_consumers_per_connection: 10_000,
            max_queues: 100_000,
            max_unconfirmed_per_connection: 100_000,
            handshake_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 100,
            segment_bytes: 32 * 1024 * 1024,
            queue_memory_bytes: 64 * 1024 * 1024,
            storage_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(16)),
            max_open_segments: 256,
            memory_high_watermark_bytes: default_memory_watermark(),
            disk_free_low_watermark_bytes: 50 * 1024 * 1024,
            http: "127.0.0.1:15680".into(),
            amqp_listen: "off".into(),
            amqps_listen: "off".into(),
            http_tls: false,
            http_allow_hosts: Vec::new(),
            http_allow_origins: Vec::new(),
            alarm_webhook: None,
            node_id: 0,
            cluster_listen: "127.0.0.1:5690".into(),
            peers: String::new(),
            advertise_addr: String::new(),
            cluster_snapshot_entries: 5000,
            queue_groups: 3,
        }
    }
}

impl Config {
    /// Reads a TOML file; keys it does not set keep their defaults.
    pub fn from_file(path: &Path) -> Result<Config, StartError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StartError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|span| line_and_column(&text, span.start)).unwrap_or_default();
            let message = e.message().trim().replace('\n', "; ");
            StartError::Config(format!("{}{at}: {message}", path.display()))
        })
    }

    /// How this node joins a cluster, if it is in one (`node_id` set).
    pub fn cluster(&self) -> Result<Option<crate::cluster::ClusterConfig>, StartError> {
        if self.node_id == 0 {
            if !self.peers.is_empty() {
                return Err(StartError::Config("--peers needs --node-id".into()));
            }
            return Ok(None);
        }
        let peers = crate::cluster::ClusterConfig::parse_peers(&self.peers)
            .map_err(|e| StartError::Config(format!("--peers: {e}")))?;
        let config = crate::cluster::ClusterConfig {
            node_id: self.node_id,
            listen: self.cluster_listen.clone(),
            peers,
            snapshot_entries: self.cluster_snapshot_entries,
            queue_groups: self.queue_groups,
        };
        config.validate().map_err(StartError::Config)?;
        Ok(Some(config))
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), StartError> {
        self.cluster()?;
        let min = hopper_proto::HANDSHAKE_MAX_FRAME_SIZE;
        if self.max_frame_size < min || self.max_frame_size > hopper_proto::DEFAULT_MAX_FRAME_SIZE {
            return Err(StartError::Config(format!(
                "max_frame_size must be between {min} and {} bytes, got {}",
                hopper_proto::DEFAULT_MAX_FRAME_SIZE,
                self.max_frame_size
            )));
        }
        for (name, value) in [
            ("max_connections_per_user", self.max_connections_per_user),
            ("max_consumers_per_connection", self.max_consumers_per_connection),
            ("max_queues", self.max_queues),
            ("max_unconfirmed_per_connection", self.max_unconfirmed_per_connection),
        ] {
            if value == 0 {
                return Err(StartError::Config(format!("{name} must be at least 1")));
            }
        }
        if self.max_connections == 0 {
            return Err(StartError::Config("max_connections must be at least 1".into()));
        }
        if !(4096..=1 << 30).contains(&self.segment_bytes) {
            return Err(StartError::Config("segment_bytes must be between 4096 and 1073741824".into()));
        }
        if !(1..=64).contains(&self.storage_threads) {
            return Err(StartError::Config("storage_threads must be between 1 and 64".into()));
        }
        if !(1..=65_536).contains(&self.max_open_segments) {
            return Err(StartError::Config("max_open_segments must be between 1 and 65536".into()));
        }
        if self.write_timeout_ms == 0 {
            return Err(StartError::Config("write_timeout_ms must be at least 1".into()));
        }
        if self.fsync_interval_ms == 0 {
            return Err(StartError::Config("fsync_interval_ms must be at least 1".into()));
        }
        if self.listen.is_empty() {
            return Err(StartError::Config("listen address is empty (\"off\" turns it off)".into()));
        }
        self.validate_tls()?;
        crate::http::allow::Allowed::new(&self.http_allow_hosts, &self.http_allow_origins)
            .map_err(StartError::Config)?;
        Ok(())
    }

    /// The plain listener's address, unless it is off.
    pub fn plain_listen(&self) -> Option<&str> {
        listener_addr(&self.listen)
    }

    /// The TLS listener's address, unless it is off.
    pub fn tls_listen(&self) -> Option<&str> {
        listener_addr(&self.tls_listen)
    }

    /// The AMQP listener's address, if it is on.
    pub fn amqp_listen(&self) -> Option<&str> {
        listener_addr(&self.amqp_listen)
    }

    /// The AMQPS listener's address, if it is on.
    pub fn amqps_listen(&self) -> Option<&str> {
        listener_addr(&self.amqps_listen)
    }

    /// The HTTP listener's address, unless it is off.
    pub fn http_listen(&self) -> Option<&str> {
        listener_addr(&self.http)
    }

    /// The TLS settings make sense together; the files themselves are read at start.
    fn validate_tls(&self) -> Result<(), StartError> {
        if self.plain_listen().is_none() && self.tls_listen().is_none() {
            return Err(StartError::Config(
                "listen is off and tls_listen is not set: the broker would accept no connection".into(),
            ));
        }
        let has_certificate = self.tls_cert.is_some() && self.tls_key.is_some();
        if self.http_tls {
            if self.http_listen().is_none() {
                return Err(StartError::Config(
                    "http_tls is set but http is off: HTTPS is the HTTP listener's; give it an \
                     address (--http ADDR)"
                        .into(),
                ));
            }
            if !has_certificate {
                return Err(StartError::Config(
                    "http_tls needs a certificate and its key: set tls_cert and tls_key \
                     (--tls-cert FILE --tls-key FILE)"
                        .into(),
                ));
            }
        }
        if self.amqps_listen().is_some() && !has_certificate {
            return Err(StartError::Config(
                "amqps_listen needs a certificate and its key: set tls_cert and tls_key \
                 (--tls-cert FILE --tls-key FILE)"
                    .into(),
            ));
        }
        if self.tls_listen().is_some() || self.amqps_listen().is_some() {
            if !has_certificate {
                return Err(StartError::Config(
                    "tls_listen needs a certificate and its key: set tls_cert and tls_key \
                     (--tls-cert FILE --tls-key FILE)"
                        .into(),
                ));
            }
            return Ok(());
        }
        if self.http_tls {
            // The certificate serves HTTPS; a client CA would serve nothing, since HTTPS does
            // not ask for client certificates.
            return match self.tls_client_ca {
                Some(_) => Err(StartError::Config(
                    "tls_client_ca is set but tls_listen is off: client certificates are asked \
                     for on the TLS listener only (HTTPS logs in with Basic auth or tokens); \
                     set tls_listen (--tls-listen ADDR) too"
                        .into(),
                )),
                None => Ok(()),
            };
        }
        let stray = [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_client_ca", &self.tls_client_ca),
        ]
        .into_iter()
        .find_map(|(key, value)| value.as_ref().map(|_| key));
        match stray {
            // A certificate without a listener is a mistake worth a refusal: the operator
            // believes clients can connect with TLS.
            Some(key) => {
                let or_https = match key {
                    "tls_client_ca" => "",
                    _ => ", or http_tls (--http-tls) for HTTPS",
                };
                Err(StartError::Config(format!(
                    "{key} is set but tls_listen is off: set tls_listen (--tls-listen ADDR) too{or_https}"
                )))
            }
            None => Ok(()),
        }
    }

    /// The storage part of the configuration.
    pub fn storage(&self) -> StorageConfig {
        StorageConfig {
            fsync: self.fsync,
            fsync_interval: Duration::from_millis(self.fsync_interval_ms),
            segment_bytes: self.segment_bytes,
            queue_memory_bytes: self.queue_memory_bytes,
            threads: self.storage_threads,
            max_open_segments: self.max_open_segments,
        }
    }

    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The write deadline.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

/// A listener's address, or `None` for "off" (or empty, for `tls_listen`).
fn listener_addr(addr: &str) -> Option<&str> {
    match addr {
        "off" | "" => None,
        addr => Some(addr),
    }
}

/// 40% of the machine's memory (as RabbitMQ's default), or 1 GiB when it cannot be read.
fn default_memory_watermark() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        text.lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    total_kib.map_or(1 << 30, |kib| kib * 1024 / 10 * 4)
}

/// ":LINE:COLUMN" (1-based) of a byte offset, for one-line error messages.
fn line_and_column(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(":{line}:{column}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_overrides_only_what_it_sets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hopper.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:7000\"\nheartbeat_ms = 500\nfsync = \"batch\"\n").unwrap();
        let config = Config::from_file(&path).unwrap();
        assert_eq!(config.listen, "0.0.0.0:7000");
        assert_eq!(config.heartbeat_ms, 500);
        assert_eq!(config.fsync, FsyncPolicy::Batch);
        assert_eq!(config.max_frame_size, Config::default().max_frame_size);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hopper.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let error = Config::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("lisen") && error.contains(":1:1"), "{error}");
        assert_eq!(error.lines().count(), 1, "{error}");
        let config = Config { max_frame_size: 10, ..Config::default() };
        assert!(config.validate().is_err());
    }

    #[test]
    fn tls_settings_must_come_together() {
        let tls = Config {
            tls_listen: "127.0.0.1:0".into(),
            tls_cert: Some("cert.pem".into()),
            tls_key: Some("key.pem".into()),
            ..Config::default()
        };
        tls.validate().unwrap();
        Config { listen: "off".into(), ..tls.clone() }.validate().unwrap();
        let amqps = Config { tls_listen: "off".into(), amqps_listen: "127.0.0.1:0".into(), ..tls.clone() };
        amqps.validate().unwrap();
        let error = Config { tls_key: None, ..amqps }.validate().unwrap_err().to_string();
        assert!(error.contains("amqps_listen needs a certificate"), "{error}");
        let error = Config { tls_key: None, ..tls.clone() }.validate().unwrap_err().to_string();
        assert!(error.contains("tls_key") && error.contains("--tls-key"), "{error}");
        let error = Config { tls_listen: "off".into(), ..tls.clone() }.validate().unwrap_err().to_string();
        assert!(error.contains("tls_cert is set but tls_listen is off"), "{error}");
        let error = Config { listen: "off".into(), ..Config::default() }.validate().unwrap_err().to_string();
        assert!(error.contains("no connection"), "{error}");
        assert_eq!(tls.plain_listen(), Some("127.0.0.1:5680"));
        assert_eq!(Config::default().tls_listen(), None);
    }

    #[test]
    fn https_needs_the_certificate_but_not_the_tls_listener() {
        let https = Config {
            http_tls: true,
            tls_cert: Some("cert.pem".into()),
            tls_key: Some("key.pem".into()),
            ..Config::default()
        };
        https.validate().unwrap();
        Config { tls_listen: "127.0.0.1:0".into(), ..https.clone() }.validate().unwrap();
        let with_ca = Config { tls_client_ca: Some("ca.pem".into()), ..https.clone() };
        Config { tls_listen: "127.0.0.1:0".into(), ..with_ca.clone() }.validate().unwrap();
        let errors = [
            (Config { tls_cert: None, ..https.clone() }, "http_tls needs a certificate"),
            (Config { tls_key: None, ..https.clone() }, "--tls-key"),
            (Config { http: "off".into(), ..https.clone() }, "http_tls is set but http is off"),
            (with_ca, "tls_client_ca is set but tls_listen is off"),
            (Config { http_tls: false, ..https.clone() }, "or http_tls (--http-tls)"),
        ];
        for (config, expected) in errors {
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
            assert_eq!(error.lines().count(), 1, "{error}");
        }
        assert_eq!(Config { http: "off".into(), ..Config::default() }.http_listen(), None);
    }

    #[test]
    fn http_tls_comes_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hopper.toml");
        std::fs::write(&path, "http_tls = true\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n").unwrap();
        let config = Config::from_file(&path).unwrap();
        assert!(config.http_tls);
        config.validate().unwrap();
    }

    #[test]
    fn http_allow_lists_come_from_the_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hopper.toml");
        let text =
            "http_allow_hosts = [\"hopper.internal\"]\nhttp_allow_origins = [\"https://ops.example.com\"]\n";
        std::fs::write(&path, text).unwrap();
        let config = Config::from_file(&path).unwrap();
        assert_eq!(config.http_allow_hosts, ["hopper.internal"]);
        assert_eq!(config.http_allow_origins, ["https://ops.example.com"]);
        config.validate().unwrap();
        let config = Config { http_allow_origins: vec!["null".into()], ..Config::default() };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("--http-allow-origin") && error.contains("'null'"), "{error}");
        let config = Config { http_allow_hosts: vec!["hopper.internal:80".into()], ..Config::default() };
        assert!(config.validate().is_err());
    }
}
