//! A client given several broker addresses connects to the first that answers, passes over
//! those that do not, says which failed and why when none does, and stops at a refused login.

use std::net::SocketAddr;

use hopper_client::{ConnectOptions, Connection, Credentials, Error};
use hopper_tests::{cli_at, connect, run, Broker};

/// An address nothing listens on: a port the kernel handed out and that was closed again.
fn dead_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address")
}

#[tokio::test]
async fn the_first_broker_that_answers_is_used() {
    let broker = Broker::start();
    let addrs = [dead_address().to_string(), broker.addr().to_string()];
    let connection =
        Connection::connect_any(&addrs, ConnectOptions::default()).await.expect("the live broker");
    connection.declare_queue("reached", Default::default()).await.expect("a working connection");
    let other = connect(&broker).await;
    assert!(other.queue_stats("reached").await.is_ok(), "declared on the broker that answered");
}

#[tokio::test]
async fn when_none_answers_the_error_names_each_address() {
    let (first, second) = (dead_address(), dead_address());
    let result = Connection::connect_any(&[first, second], ConnectOptions::default()).await;
    let Err(Error::Unreachable(detail)) = result else { panic!("expected Unreachable, got {result:?}") };
    assert!(detail.contains(&first.to_string()) && detail.contains(&second.to_string()), "{detail}");
    let empty: [&str; 0] = [];
    let result = Connection::connect_any(&empty, ConnectOptions::default()).await;
    assert!(matches!(result, Err(Error::Unreachable(_))), "{result:?}");
}

#[tokio::test]
async fn a_refused_login_is_not_tried_on_the_next_broker() {
    let locked = Broker::start();
    let guest = connect(&locked).await;
    guest.add_user("root", "root-pw", &["admin".to_string()]).await.unwrap();
    // The next broker would let the same login in: the search must not get there.
    let open = Broker::start();
    connect(&open).await.add_user("root", "wrong", &["admin".to_string()]).await.unwrap();
    let options =
        ConnectOptions { credentials: Some(Credentials::new("root", "wrong")), ..ConnectOptions::default() };
    let result = Connection::connect_any(&[locked.addr(), open.addr()], options).await;
    assert!(matches!(result, Err(Error::Authentication(_))), "{result:?}");
}

/// `hopper --server SERVERS args...`, run to completion.
async fn hopper(servers: &str, args: &[&str]) -> hopper_tests::CliOutput {
    let mut command = cli_at(servers);
    command.args(args);
    run(command).await
}

#[tokio::test]
async fn the_cli_takes_a_comma_separated_list() {
    let broker = Broker::start();
    let dead = dead_address();
    let output = hopper(&format!("{dead},{}", broker.addr()), &["queue", "declare", "listed"]).await;
    assert!(output.success(), "{output}");
    let stats = hopper(&broker.addr().to_string(), &["queue", "stats", "listed"]).await;
    assert!(stats.success(), "{stats}");

    let other = dead_address();
    let output = hopper(&format!("{dead}, {other}"), &["status"]).await;
    assert!(!output.success());
    let error = output.stderr.trim();
    assert!(error.contains("no broker could be reached"), "{error}");
    assert!(error.contains(&dead.to_string()) && error.contains(&other.to_string()), "{error}");
    assert_eq!(error.lines().count(), 1, "one line: {error}");

    for empty in [",", " , "] {
        let output = hopper(empty, &["status"]).await;
        assert!(!output.success());
        assert_eq!(output.stderr.trim(), "hopper: error: --server names no broker", "--server '{empty}'");
    }
}
