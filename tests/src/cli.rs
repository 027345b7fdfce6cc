//! Running the `hopper` command against a test broker and capturing what it printed.

use std::fmt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::broker::{self, Broker};

/// How long one CLI invocation may take before the test fails.
const CLI_DEADLINE: Duration = Duration::from_secs(20);

/// A `hopper` command aimed at `broker` (`--server ADDR` already set).
pub fn cli(broker: &Broker) -> Command {
    cli_at(&broker.addr().to_string())
}

/// A `hopper` command aimed at `server`.
pub fn cli_at(server: &str) -> Command {
    let mut command = broker::command("hopper");
    command.arg("--server").arg(server);
    command
}

/// What a finished CLI invocation left behind.
pub struct CliOutput {
    /// The exit status.
    pub status: ExitStatus,
    /// Standard output, as text.
    pub stdout: String,
    /// Standard error, as text.
    pub stderr: String,
}

impl CliOutput {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics (showing everything the command printed) unless it exited with status 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "the command failed:\n{self}");
        self
    }

    /// Panics unless the command failed with exactly one `hopper: error: ...` line on stderr;
    /// returns that line.
    pub fn assert_one_line_error(&self) -> &str {
        assert!(!self.success(), "the command should have failed:\n{self}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected exactly one stderr line:\n{self}");
        assert!(lines[0].starts_with("hopper: error: "), "unexpected error line:\n{self}");
        lines[0]
    }

    /// Standard output parsed as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| panic!("stdout is not JSON ({err}):\n{self}"))
    }

    /// Standard output parsed as one JSON document per line.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("line {line:?} is not JSON ({err}):\n{self}"))
            })
            .collect()
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "status: {}\nstdout:\n{}\nstderr:\n{}", self.status, self.stdout, self.stderr)
    }
}

/// Runs `command` to completion with no input.
pub async fn run(command: Command) -> CliOutput {
    run_with_stdin(command, None).await
}

/// Runs `hopper --server <broker> args...` to completion with no input.
pub async fn run_cli(broker: &Broker, args: &[&str]) -> CliOutput {
    let mut command = cli(broker);
    command.args(args);
    run(command).await
}

/// Runs `command` to completion, writing `input` (if any) to its stdin and then closing it.
pub async fn run_with_stdin(command: Command, input: Option<&str>) -> CliOutput {
    let description = format!("{command:?}");
    let mut command = tokio::process::Command::from(command);
    command
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap_or_else(|err| panic!("spawn {description}: {err}"));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin.write_all(input.as_bytes()).await.expect("write the command's stdin");
        drop(stdin);
    }
    let output = tokio::time::timeout(CLI_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{description} did not finish within {CLI_DEADLINE:?}"))
        .expect("wait for the command");
    CliOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
