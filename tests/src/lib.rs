//! The harness shared by Hopper's integration tests: it starts the real `hopperd` as a child
//! process (and restarts it on the same data directory), runs the `hopper` CLI against it,
//! connects with `hopper-client`, speaks raw frames for the bad-input tests and raw AMQP 0-9-1
//! frames for the AMQP tests, reads durable queues' files for the durability tests, speaks HTTP
//! and HTTPS to the broker's HTTP listener (and plays an alarm webhook) for the HTTP tests, makes throwaway CAs for the TLS tests, and
//! cuts the links between cluster nodes with TCP proxies for the partition tests.
//!
//! The binaries must be built first (`cargo build --workspace --bins --examples`; the client's
//! examples are run too): they are looked up in the target directory next to the test
//! executable.

mod amqp;
mod broker;
mod cli;
mod client;
mod failure;
mod http;
mod pki;
mod proxy;
mod raw;
mod storage;
mod wait;
mod webhook;

pub use amqp::{connection_close, is_open_ok, AmqpRaw};
pub use broker::{binary, command, example, example_command, send_signal, Broker};
pub use cli::{cli, cli_at, run, run_cli, run_with_stdin, CliOutput};
pub use client::{
    assert_serves, body_text, connect, connect_with, next_deliveries, next_delivery, publish_all,
    receive_backlog, stats_eventually,
};
pub use failure::{declare_with_dead_letter, declared_options, take_ready, unix_ms};
pub use http::{
    json_id, messages, read_request, receipt, segment, write_response, Http, HttpRequest, HttpResponse,
    Https, REQUEST_HEADER,
};
pub use pki::{path_arg, Pki};
pub use proxy::Proxy;
pub use raw::RawConn;
pub use storage::{
    clean_marker_present, log_dir, parse_segment, queue_dir, queue_id, read_segment, records_of,
    segment_files, Record, RecordKind, RECORD_HEADER, SEGMENT_MAGIC,
};
pub use wait::{eventually, within, DEADLINE};
pub use webhook::{Received, WebhookReceiver};
