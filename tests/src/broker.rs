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
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOPPER_") {
            command.env_remove(key);
        }
    }
    command
}

/// A running `hopperd`. Dropping it kills the process.
pub struct Broker {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The thread draining stderr; it ends when the broker exits and the pipe closes.
    stderr_reader: Option<JoinHandle<()>>,
    data_dir: TempDir,
}

impl Broker {
    /// Starts `hopperd` on `127.0.0.1:0` with a fresh data directory.
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// Starts `hopperd` like [`Broker::start`], passing `args` as extra flags.
    pub fn start_with(args: &[&str]) -> Broker {
        let data_dir = tempfile::tempdir().expect("create a temporary data directory");
        let mut child = command("hopperd")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(args)
            .env("HOPPER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hopperd");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (stderr_reader, lines) =
            drain_lines(child.stderr.take().expect("stderr is piped"), stderr.clone());
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = listening_addr(&line) {
                        break addr;
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
        Broker { child, addr, stderr, stderr_reader: Some(stderr_reader), data_dir }
    }

    /// The address the broker listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The broker's data directory.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
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

/// The address in a `... listening on 127.0.0.1:46719 data_dir=...` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("listening on ")?;
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
    }
}
