//! A real `hopperd` child process on a free port with a temporary data directory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long the broker may take to print its listening address.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);
/// How long the broker may take to exit after SIGTERM.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// The directory holding the workspace's binaries: the test executable lives in its `deps/`.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let deps = exe.parent().expect("the test executable sits in a directory");
    deps.parent().expect("deps/ sits in the target directory").to_path_buf()
}

/// The path of a workspace binary, or a panic saying how to build it.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} not found; build the binaries first: cargo build --workspace --bins",
        path.display()
    );
    path
}

/// A `Command` for a workspace binary, with every `HOPPER_*` variable of the caller's
/// environment removed so that only the arguments given here configure it.
pub fn command(name: &str) -> Command {
    let mut command = Command::new(binary(name));
    remove_hopper_env(&mut command);
    command
}

/// The path of an example of the client crate, or a panic saying how to build it.
pub fn example(name: &str) -> PathBuf {
    let path = bin_dir().join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} not found; build the examples first: cargo build --examples -p hopper-client",
        path.display()
    );
    path
}

/// A `Command` for an example of the client crate, with no `HOPPER_*` variable of the
/// caller's environment (set `HOPPER_SERVER` to aim it at a test broker).
pub fn example_command(name: &str) -> Command {
    let mut command = Command::new(example(name));
    remove_hopper_env(&mut command);
    command
}

/// Removes every `HOPPER_*` variable of the caller's environment from `command`.
fn remove_hopper_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOPPER_") {
            command.env_remove(key);
        }
    }
}

/// A running `hopperd`. Dropping it kills the process.
///
/// A broker can be stopped ([`terminate`](Self::terminate), [`kill`](Self::kill)) and started
/// again on the same data directory with the same flags ([`restart`](Self::restart)): that is
/// how the durability tests crash and recover it.
pub struct Broker {
    child: Child,
    addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    amqp_addr: Option<SocketAddr>,
    amqps_addr: Option<SocketAddr>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The thread draining stderr; it ends when the broker exits and the pipe closes.
    stderr_reader: Option<JoinHandle<()>>,
    launch: Launch,
    /// Owns the data directory when the harness made it, so it outlives every restart and is
    /// removed with the broker.
    _temp_dir: Option<TempDir>,
}

/// How `hopperd` was started, to start it again the same way.
#[derive(Debug, Clone)]
struct Launch {
    /// A command `hopperd` runs under, e.g. `prlimit --fsize=65536`; empty for none.
    wrapper: Vec<String>,
    data_dir: PathBuf,
    args: Vec<String>,
}

/// A freshly started `hopperd`: the process, its address, and its stderr as it comes in.
struct Started {
    child: Child,
    addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    amqp_addr: Option<SocketAddr>,
    amqps_addr: Option<SocketAddr>,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: JoinHandle<()>,
}

impl Broker {
    /// Starts `hopperd` on `127.0.0.1:0` with a fresh data directory.
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// Starts `hopperd` like [`Broker::start`], passing `args` as extra flags.
    pub fn start_with(args: &[&str]) -> Broker {
        let data_dir = tempfile::tempdir().expect("create a temporary data directory");
        Broker::launch(Launch::new(&[], data_dir.path(), args), Some(data_dir))
    }

    /// Starts `hopperd` on `127.0.0.1:0` with `data_dir`, which the caller keeps alive, and
    /// `args` as extra flags. A broker started later on the same directory finds what this one
    /// stored.
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Broker {
        Broker::start_wrapped(&[], data_dir, args)
    }

    /// Like [`Broker::start_in`], running `hopperd` under `wrapper`: a command that execs the
    /// command line it is given, such as `["prlimit", "--fsize=65536"]` to cap the size of the
    /// files the broker may write.
    pub fn start_wrapped(wrapper: &[&str], data_dir: &Path, args: &[&str]) -> Broker {
        Broker::launch(Launch::new(wrapper, data_dir, args), None)
    }

    fn launch(launch: Launch, temp_dir: Option<TempDir>) -> Broker {
        let Started { child, addr, tls_addr, http_addr, amqp_addr, amqps_addr, stderr, stderr_reader } =
            launch.start();
        Broker {
            child,
            addr,
            tls_addr,
            http_addr,
            amqp_addr,
            amqps_addr,
            stderr,
            stderr_reader: Some(stderr_reader),
            launch,
            _temp_dir: temp_dir,
        }
    }

    /// Starts `hopperd` again on the same data directory, with the same flags and wrapper (on a
    /// new port). The previous process must have exited: see [`terminate`](Self::terminate) and
    /// [`kill`](Self::kill). From now on [`stderr`](Self::stderr) is the new process's.
    pub fn restart(&mut self) {
        assert!(!self.is_running(), "hopperd {} is still running; stop it before restarting", self.pid());
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        let Started { child, addr, tls_addr, http_addr, amqp_addr, amqps_addr, stderr, stderr_reader } =
            self.launch.start();
        self.child = child;
        self.addr = addr;
        self.tls_addr = tls_addr;
        self.http_addr = http_addr;
        self.amqp_addr = amqp_addr;
        self.amqps_addr = amqps_addr;
        self.stderr = stderr;
        self.stderr_reader = Some(stderr_reader);
    }

    /// The address the broker listens on (plain TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("the broker runs its plain listener (it was started with --listen off)")
    }

    /// The address of the broker's TLS listener (`--tls-listen`).
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addr.expect("the broker runs a TLS listener (start it with --tls-listen)")
    }

    /// The address of the broker's HTTP listener (metrics, API, dashboard), HTTP or HTTPS.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr.expect("the broker runs its HTTP listener")
    }

    /// The address of the broker's AMQP listener (`--amqp-listen`).
    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp_addr.expect("the broker runs an AMQP listener (start it with --amqp-listen 127.0.0.1:0)")
    }

    /// The address of the broker's AMQPS listener (`--amqps-listen`).
    pub fn amqps_addr(&self) -> SocketAddr {
        self.amqps_addr.expect("the broker runs an AMQPS listener (start it with --amqps-listen 127.0.0.1:0)")
    }

    /// The broker's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.launch.data_dir
    }

    /// True until the process has exited.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll hopperd").is_none()
    }

    /// The process id of `hopperd`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the broker wrote to stderr so far.
    pub fn stderr(&self) -> String {
        join(&self.stderr)
    }

    /// Kills the broker with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM without waiting for the broker to exit.
    ///
    /// First waits until `hopperd` has installed its SIGTERM handler: it prints its listening
    /// line a moment before, and a SIGTERM in between would take the default action (death by
    /// signal) instead of a graceful shutdown.
    pub fn signal_terminate(&self) {
        self.wait_for_sigterm_handler();
        send_signal(self.child.id(), "TERM");
    }

    /// Polls `/proc/<pid>/status` until SIGTERM is among the caught signals (Linux only; a
    /// no-op where `/proc` is missing).
    fn wait_for_sigterm_handler(&self) {
        const SIGTERM_BIT: u64 = 1 << (15 - 1);
        let status = format!("/proc/{}/status", self.child.id());
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            let Ok(text) = std::fs::read_to_string(&status) else { return };
            let caught = text
                .lines()
                .find_map(|line| line.strip_prefix("SigCgt:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok());
            match caught {
                Some(mask) if mask & SIGTERM_BIT != 0 => return,
                Some(_) => {}
                None => return,
            }
            assert!(
                Instant::now() < deadline,
                "hopperd did not install a SIGTERM handler within {STARTUP_DEADLINE:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the broker to exit; panics with its stderr if it takes longer than `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll hopperd") {
                // Collect the last lines too: the pipe closed with the process.
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "hopperd did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGTERM and waits for the broker to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_terminate();
        self.wait_exit(EXIT_DEADLINE)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Launch {
    fn new(wrapper: &[&str], data_dir: &Path, args: &[&str]) -> Launch {
        Launch {
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            data_dir: data_dir.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Spawns `hopperd` and waits until it prints its listening address.
    fn start(&self) -> Started {
        let mut command = match self.wrapper.split_first() {
            None => command("hopperd"),
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(binary("hopperd"));
                remove_hopper_env(&mut command);
                command
            }
        };
        // The HTTP listener defaults to a fixed port; tests run side by side, so each broker
        // takes a free one unless the test chose.
        if !self.args.iter().any(|a| a == "--http") {
            command.args(["--http", "127.0.0.1:0"]);
        }
        if !self.args.iter().any(|a| a == "--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            // HOPPER_TEST_LOG sets the test brokers' log filter (HOPPER_LOG's syntax) when a test
            // needs more of their log than its failure prints.
            .env("HOPPER_LOG", std::env::var("HOPPER_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("spawn hopperd ({self:?}): {err}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (stderr_reader, lines) =
            drain_lines(child.stderr.take().expect("stderr is piped"), stderr.clone());
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let mut http_addr = None;
        let mut tls_addr = None;
        let mut amqp_addr = None;
        let mut amqps_addr = None;
        // The plain listener's line comes last; without one, the TLS line does.
        let plain_off = self.args.windows(2).any(|pair| pair[0] == "--listen" && pair[1] == "off");
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = http_listening_addr(&line) {
                        http_addr = Some(addr);
                    } else if let Some(addr) = amqp_listening_addr(&line) {
                        amqp_addr = Some(addr);
                    } else if let Some(addr) = amqps_listening_addr(&line) {
                        amqps_addr = Some(addr);
                    } else if let Some(addr) = tls_listening_addr(&line) {
                        tls_addr = Some(addr);
                        if plain_off {
                            break None;
                        }
                    } else if let Some(addr) = listening_addr(&line) {
                        break Some(addr);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "hopperd printed no 'listening on' line within {STARTUP_DEADLINE:?}; stderr:\n{}",
                        join(&stderr)
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait for hopperd");
                    panic!("hopperd exited with {status} before listening; stderr:\n{}", join(&stderr));
                }
            }
        };
        Started { child, addr, tls_addr, http_addr, amqp_addr, amqps_addr, stderr, stderr_reader }
    }
}

/// Sends `signal` (a name such as `TERM`) to process `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status =
        Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().expect("run kill(1)");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// Reads `reader` line by line on a thread until it closes, keeping every line in `kept` and
/// passing it on through the returned channel (ignored once nobody listens). Draining never
/// stops, so the child never blocks on a full pipe.
fn drain_lines(
    reader: impl std::io::Read + Send + 'static,
    kept: Arc<Mutex<Vec<String>>>,
) -> (JoinHandle<()>, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            kept.lock().expect("stderr lines lock").push(line.clone());
            let _ = tx.send(line);
        }
    });
    (thread, rx)
}

/// The address in a `... hopperd: listening on 127.0.0.1:46719 data_dir=...` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("hopperd: listening on ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The address in a `... hopperd: http listening on 127.0.0.1:8080 (dashboard ...)` log line,
/// or its `https listening on` form (`--http-tls`).
fn http_listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line
        .split_once("hopperd: http listening on ")
        .or_else(|| line.split_once("hopperd: https listening on "))?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The address in a `... hopperd: amqp listening on 127.0.0.1:5672` log line.
fn amqp_listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("hopperd: amqp listening on ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The address in a `... hopperd: amqps listening on 127.0.0.1:5671` log line.
fn amqps_listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("hopperd: amqps listening on ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The address in a `... hopperd: tls listening on 127.0.0.1:5681` log line.
fn tls_listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("hopperd: tls listening on ")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn join(lines: &Mutex<Vec<String>>) -> String {
    lines.lock().expect("stderr lines lock").join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let line = "2026-01-01T00:00:00.000000Z  INFO hopperd: listening on 127.0.0.1:46719 \
                    data_dir=/tmp/x version=\"0.1.0\"";
        assert_eq!(listening_addr(line), Some("127.0.0.1:46719".parse().unwrap()));
        assert_eq!(listening_addr("INFO hopperd: session open"), None);
        let http = "INFO hopperd: http listening on 127.0.0.1:8080 (dashboard at http://127.0.0.1:8080/)";
        assert_eq!(http_listening_addr(http), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(listening_addr(http), None);
        let https = "INFO hopperd: https listening on 127.0.0.1:8443 (dashboard at https://127.0.0.1:8443/)";
        assert_eq!(http_listening_addr(https), Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(listening_addr(https), None);
        assert_eq!(tls_listening_addr(https), None);
        let tls = "INFO hopperd: tls listening on 127.0.0.1:5681";
        assert_eq!(tls_listening_addr(tls), Some("127.0.0.1:5681".parse().unwrap()));
        assert_eq!(listening_addr(tls), None);
        assert_eq!(http_listening_addr(tls), None);
    }
}
