//! HTTPS on the HTTP listener (`--http-tls`): the API, dashboard and metrics over TLS with the
//! binary protocol's certificate, no plain HTTP on that port, handshakes that hold up nobody,
//! the listener's own origin being `https://`, and the startup errors. Every certificate is
//! made by a throwaway CA ([`Pki`]).

use std::time::{Duration, Instant};

use hopper_client::{ConnectOptions, Connection};
use hopper_tests::{
    command, eventually, path_arg as path, run, within, Broker, HttpResponse, Https, Pki, DEADLINE,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A broker whose HTTP listener speaks HTTPS with a certificate from `pki`, with `extra`'s flags.
fn https_broker(pki: &Pki, extra: &[&str]) -> Broker {
    let (cert, key) = pki.server();
    let mut args = vec!["--http-tls", "--tls-cert", path(&cert), "--tls-key", path(&key)];
    args.extend_from_slice(extra);
    Broker::start_with(&args)
}

/// A client of `broker`'s HTTPS listener that trusts `pki`'s CA.
fn https_client(broker: &Broker, pki: &Pki) -> Https {
    Https::new(broker.http_addr(), &pki.ca_pem(), "localhost")
}

#[tokio::test]
async fn the_api_dashboard_and_metrics_answer_over_https() {
    let pki = Pki::new("main");
    let mut broker = https_broker(&pki, &[]);
    let addr = broker.http_addr();
    let stderr = broker.stderr();
    assert!(
        stderr.contains(&format!("https listening on {addr} (dashboard at https://{addr}/)")),
        "{stderr}"
    );
    let https = https_client(&broker, &pki);
    https.put_json("/api/queues/secure", &json!({})).await.assert_status(201);
    let queues = https.get("/api/queues").await.assert_status(200).json();
    let names: Vec<&str> =
        queues.as_array().expect("a list").iter().filter_map(|q| q["name"].as_str()).collect();
    assert_eq!(names, ["secure"], "{queues}");
    // The loopback guest login goes by the peer's address: the handlers get it over TLS too.
    assert_eq!(https.get("/api/whoami").await.assert_status(200).json()["name"], "guest");
    assert!(https.get("/").await.assert_status(200).body.contains("<html"));
    assert!(https.get("/metrics").await.assert_status(200).body.contains("hopper_"));
    // The binary protocol is not affected: its plain listener serves the same queues.
    let conn = Connection::connect_with(broker.addr(), ConnectOptions::default()).await.unwrap();
    assert_eq!(conn.queue_stats("secure").await.unwrap().ready, 0);
    drop(conn);
    // HTTPS shuts down with the broker as HTTP does.
    assert_eq!(broker.terminate().code(), Some(0), "{}", broker.stderr());
}

#[tokio::test]
async fn plain_http_and_untrusting_clients_get_no_answer_and_the_listener_serves_on() {
    let pki = Pki::new("main");
    let broker = https_broker(&pki, &[]);
    let addr = broker.http_addr();

    let mut plain = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /api/queues HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    plain.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // Whether the broker closes the connection or resets it, no HTTP comes back.
    let _ = within("the broker to close a plain HTTP connection", plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP got an answer: {}", String::from_utf8_lossy(&answer));

    let stranger = Pki::new("stranger");
    let untrusting = Https::new(addr, &stranger.ca_pem(), "localhost");
    let host = addr.to_string();
    let error =
        untrusting.try_request_with("GET", "/api/queues", &[("Host", &host)], None).await.unwrap_err();
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");

    https_client(&broker, &pki).get("/api/queues").await.assert_status(200);
    let logged = || async { broker.stderr().contains("https: TLS handshake failed") };
    eventually("the failed handshakes to be logged", DEADLINE, logged).await;
}

/// The handshake timeout of the test of silent clients: long enough that a request held up by
/// one would be noticed, short enough that the test waits for it to end.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_holds_up_nobody() {
    let pki = Pki::new("main");
    let config = pki.dir().join("hopper.toml");
    std::fs::write(&config, format!("handshake_timeout_ms = {}\n", HANDSHAKE_TIMEOUT.as_millis())).unwrap();
    let broker = https_broker(&pki, &["--config", path(&config)]);
    let mut silent = TcpStream::connect(broker.http_addr()).await.unwrap();
    // Accepted and waiting for its handshake, the silent client is no obstacle to others: a
    // handshake in the accept loop would hold this request up for the whole timeout...
    let started = Instant::now();
    https_client(&broker, &pki).get("/api/queues").await.assert_status(200);
    assert!(started.elapsed() < HANDSHAKE_TIMEOUT / 2, "held up for {:?}", started.elapsed());
    // ...and is closed once its time is up.
    let mut buffer = [0; 16];
    let read = within("the broker to close a silent connection", silent.read(&mut buffer)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The line is written after the connection is closed, and read from the pipe after that.
    let logged = || async { broker.stderr().contains("https: no TLS handshake in time") };
    eventually("the late handshake to be logged", DEADLINE, logged).await;
}

#[tokio::test]
async fn over_https_the_own_origin_is_https() {
    let pki = Pki::new("main");
    let broker = https_broker(&pki, &[]);
    let https = https_client(&broker, &pki);
    https.put_json("/api/queues/q", &json!({})).await.assert_status(201);
    let host = https.host();
    // What the dashboard sends, served over HTTPS.
    publish_from(&https, &format!("https://{host}")).await.assert_status(201);
    let refused = publish_from(&https, &format!("http://{host}")).await;
    let message = refused.assert_error(403, "NOT_ALLOWED");
    assert!(message.contains(&format!("(https://{host})")), "{message}");
}

/// Publishes to queue `q` as a web page of `origin` would.
async fn publish_from(https: &Https, origin: &str) -> HttpResponse {
    let host = https.host();
    let headers = [("Host", host.as_str()), ("Content-Type", "application/json"), ("Origin", origin)];
    https.request_with("POST", "/api/queues/q/messages", &headers, Some(br#"{"body":"x"}"#)).await
}

#[tokio::test]
async fn https_asks_for_no_client_certificate_even_with_mutual_tls() {
    let pki = Pki::new("main");
    let ca = pki.ca_path();
    let broker = https_broker(&pki, &["--tls-listen", "127.0.0.1:0", "--tls-client-ca", path(&ca)]);
    https_client(&broker, &pki).get("/api/queues").await.assert_status(200);
    // The TLS listener still requires one.
    let options = ConnectOptions { tls: Some(pki.tls()), ..ConnectOptions::default() };
    let refused = within("a TLS connection", Connection::connect_with(broker.tls_addr(), options)).await;
    let error = refused.expect_err("no client certificate").to_string();
    assert!(error.contains("requires a client certificate"), "{error}");
}

/// Runs `hopperd` with `args` (and an HTTP listener on a free port unless they give `--http`),
/// and expects it to refuse to start with one line; returns the line.
async fn refused_start(args: &[&str]) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut hopperd = command("hopperd");
    hopperd.args(["--data-dir", path(data.path()), "--listen", "127.0.0.1:0"]);
    if !args.contains(&"--http") {
        hopperd.args(["--http", "127.0.0.1:0"]);
    }
    hopperd.args(args);
    let output = within("hopperd to refuse to start", run(hopperd)).await;
    assert_eq!(output.status.code(), Some(1), "{output}");
    let lines: Vec<&str> = output.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line:\n{output}");
    assert!(lines[0].starts_with("hopperd: error: "), "{output}");
    lines[0].to_owned()
}

#[tokio::test]
async fn https_without_a_certificate_or_with_a_bad_one_stops_the_broker_with_one_line() {
    let pki = Pki::new("main");
    let (cert, key) = pki.server();
    let missing = pki.dir().join("missing.pem");
    let ca = pki.ca_path();
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--http-tls"], "http_tls needs a certificate and its key"),
        (vec!["--http-tls", "--tls-cert", path(&cert)], "--tls-key"),
        (
            vec!["--http-tls", "--tls-cert", path(&missing), "--tls-key", path(&key)],
            "missing.pem: cannot read it",
        ),
        (
            vec!["--http-tls", "--tls-cert", path(&cert), "--tls-key", path(&key), "--http", "off"],
            "http is off",
        ),
        (
            vec![
                "--http-tls",
                "--tls-cert",
                path(&cert),
                "--tls-key",
                path(&key),
                "--tls-client-ca",
                path(&ca),
            ],
            "tls_client_ca is set but tls_listen is off",
        ),
    ];
    for (flags, expected) in cases {
        let line = refused_start(&flags).await;
        assert!(line.contains(expected), "{flags:?}: {line}");
    }
    // The variable turns HTTPS on as the flag does.
    let data = tempfile::tempdir().unwrap();
    let mut hopperd = command("hopperd");
    hopperd.args(["--data-dir", path(data.path()), "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
    hopperd.env("HOPPER_HTTP_TLS", "true");
    let output = within("hopperd to refuse to start", run(hopperd)).await;
    assert_eq!(output.status.code(), Some(1), "{output}");
    assert!(output.stderr.contains("http_tls needs a certificate"), "{output}");
}
