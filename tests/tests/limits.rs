//! Limits per user and per connection: past one, that request (or that login) is refused with
//! RESOURCE_LIMIT saying which limit and its flag, and everyone else goes on.

use bytes::BytesMut;
use hopper_client::{
    ConnectOptions, Connection, ConsumeOptions, Credentials, Error, ErrorCode, QueueOptions,
};
use hopper_proto::{encode_frame, pb, Body, Frame};
use hopper_tests::{connect, Broker, RawConn};

fn resource_limit<T: std::fmt::Debug>(result: Result<T, Error>, flag: &str) {
    match result {
        Err(Error::Broker { code: ErrorCode::ResourceLimit, message }) => {
            assert!(message.contains(flag), "{message}")
        }
        other => panic!("expected RESOURCE_LIMIT naming {flag}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_user_past_its_connection_limit_is_refused_until_one_closes() {
    let broker = Broker::start_with(&["--max-connections-per-user", "2"]);
    let guest = connect(&broker).await;
    guest.add_user("app", "pw", &[]).await.unwrap();
    let options =
        || ConnectOptions { credentials: Some(Credentials::new("app", "pw")), ..ConnectOptions::default() };
    let first = Connection::connect_with(broker.addr(), options()).await.unwrap();
    let _second = Connection::connect_with(broker.addr(), options()).await.unwrap();
    match Connection::connect_with(broker.addr(), options()).await {
        Err(Error::HandshakeRejected { message, .. }) => {
            assert!(message.contains("--max-connections-per-user"), "{message}")
        }
        other => panic!("expected the third connection refused, got {other:?}"),
    }
    // Other users are not counted against app.
    connect(&broker).await.whoami().await.unwrap();
    first.close().await.unwrap();
    hopper_tests::eventually("app's slot to free", hopper_tests::DEADLINE, || async {
        Connection::connect_with(broker.addr(), options()).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_connection_past_its_consumer_limit_gets_resource_limit_for_that_consume_only() {
    let broker = Broker::start_with(&["--max-consumers-per-connection", "2"]);
    let conn = connect(&broker).await;
    conn.declare_queue("q", QueueOptions::default()).await.unwrap();
    let _a = conn.consume("q", ConsumeOptions::default()).await.unwrap();
    let b = conn.consume("q", ConsumeOptions::default()).await.unwrap();
    resource_limit(conn.consume("q", ConsumeOptions::default()).await, "--max-consumers-per-connection");
    // Another connection has its own count; a cancelled consumer frees a place.
    connect(&broker).await.consume("q", ConsumeOptions::default()).await.expect("another connection");
    b.cancel().await.unwrap();
    conn.consume("q", ConsumeOptions::default()).await.expect("a place freed");
}

#[tokio::test]
async fn the_broker_past_its_queue_limit_refuses_new_queues_but_not_existing_ones() {
    let broker = Broker::start_with(&["--max-queues", "2"]);
    let conn = connect(&broker).await;
    conn.declare_queue("a", QueueOptions::default()).await.unwrap();
    conn.declare_queue("b", QueueOptions::default()).await.unwrap();
    resource_limit(conn.declare_queue("c", QueueOptions::default()).await, "--max-queues");
    conn.declare_queue("a", QueueOptions::default()).await.expect("redeclaring an existing queue");
    conn.delete_queue("b", Default::default()).await.unwrap();
    conn.declare_queue("c", QueueOptions::default()).await.expect("room again");
}

#[tokio::test]
async fn publishes_past_the_unconfirmed_limit_are_refused_and_each_is_answered() {
    let broker = Broker::start_with(&["--max-unconfirmed-per-connection", "1"]);
    let conn = connect(&broker).await;
    conn.declare_queue("d", QueueOptions { durable: true, ..QueueOptions::default() }).await.unwrap();

    // A thousand publishes in one write to a durable queue: each confirm waits for a write and
    // an fsync, so most arrive while one is still in flight.
    let mut raw = RawConn::connect_hello(broker.addr()).await;
    let ids: Vec<u64> = (0..1000).map(|_| raw.next_request_id()).collect();
    let mut wire = BytesMut::new();
    for &id in &ids {
        let publish = pb::Publish { queue: "d".into(), body: "x".into(), ..Default::default() };
        encode_frame(&Frame::new(id, Body::Publish(publish)), u32::MAX, &mut wire).unwrap();
    }
    raw.send_bytes(&wire).await;
    let (mut confirmed, mut refused) = (0, 0);
    for _ in &ids {
        let frame = raw.recv_skipping_heartbeats().await.expect("an answer for every publish");
        match frame.body {
            Some(Body::PublishOk(_)) => confirmed += 1,
            Some(Body::Error(error)) => {
                assert_eq!(
                    hopper_proto::error_code(error.code),
                    ErrorCode::ResourceLimit,
                    "{}",
                    error.message
                );
                assert!(error.message.contains("--max-unconfirmed-per-connection"), "{}", error.message);
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(confirmed >= 1 && refused >= 1, "confirmed {confirmed}, refused {refused}");
    let stats = conn.queue_stats("d").await.unwrap();
    assert_eq!(stats.ready, confirmed, "only confirmed publishes are in the queue");
}
