//! The AMQP 0-9-1 listener beyond the tutorials: recover, flow and qos, exclusive queues and
//! consumers, `x-expires`, direct reply-to, exchange-to-exchange bindings, the login
//! mechanisms and AMQPS, heartbeats, publishers blocked by flow control, a consumer that
//! stops reading, and what may follow a channel's close or a queue's deletion. Full clients
//! are lapin; what a full client cannot be made to do (stay silent, pick a mechanism, stop
//! reading) is done with raw frames.

use std::collections::BTreeSet;
use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, channel, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable as RawTable};
use futures::StreamExt;
use hopper_client::{Permissions, PublishOptions};
use hopper_tests::{
    connect, connection_close, eventually, is_open_ok, path_arg as path, run_cli, within, AmqpRaw, Broker,
    Pki, DEADLINE,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRecoverOptions,
    ChannelFlowOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

fn broker_with(args: &[&str]) -> Broker {
    let mut all = vec!["--amqp-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Broker::start_with(&all)
}

async fn open(broker: &Broker) -> (Connection, Channel) {
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr());
    let connection = within("an AMQP connection", Connection::connect(&uri, ConnectionProperties::default()))
        .await
        .expect("connect over AMQP");
    let channel = connection.create_channel().await.expect("open a channel");
    (connection, channel)
}

async fn declare(channel: &Channel, queue: &str, arguments: FieldTable) {
    channel.queue_declare(queue.into(), QueueDeclareOptions::default(), arguments).await.expect("declare");
}

async fn publish_with(
    channel: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    channel
        .basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, properties)
        .await
        .expect("publish")
        .await
        .expect("publish confirm");
}

async fn publish(channel: &Channel, key: &str, body: &str) {
    publish_with(channel, "", key, body.as_bytes(), BasicProperties::default()).await;
}

async fn consume(
    channel: &Channel,
    queue: &str,
    options: BasicConsumeOptions,
) -> lapin::Result<lapin::Consumer> {
    channel.basic_consume(queue.into(), "".into(), options, FieldTable::default()).await
}

async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    within("a delivery", consumer.next()).await.expect("the consumer goes on").expect("a delivery")
}

/// The reply code name lapin gives a refusal (`NOTFOUND`, `RESOURCELOCKED`, ...).
fn refusal(error: &lapin::Error) -> String {
    format!("{error:?}")
}

#[tokio::test]
async fn recover_requeues_what_is_unsettled_and_flow_and_global_qos_answer_as_rabbitmq_does() {
    let broker = broker_with(&[]);
    let (connection, channel) = open(&broker).await;
    declare(&channel, "jobs", FieldTable::default()).await;
    for n in 0..3 {
        publish(&channel, "jobs", &format!("job {n}")).await;
    }
    channel.basic_qos(10, BasicQosOptions { global: true }).await.expect("global qos is taken");
    let mut consumer = consume(&channel, "jobs", BasicConsumeOptions::default()).await.unwrap();
    for n in 0..3 {
        let delivery = next(&mut consumer).await;
        assert_eq!((delivery.data.as_slice(), delivery.redelivered), (format!("job {n}").as_bytes(), false));
    }
    channel.basic_recover(BasicRecoverOptions { requeue: true }).await.expect("recover");
    let mut again = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut consumer).await;
        assert!(delivery.redelivered, "a recovered delivery comes flagged redelivered");
        again.push(String::from_utf8(delivery.data.clone()).unwrap());
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    again.sort();
    assert_eq!(again, ["job 0", "job 1", "job 2"]);
    let stats = connect(&broker).await.queue_stats("jobs").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 0), "{stats:?}");

    // channel.flow: on is answered, off is refused as RabbitMQ refuses it (540, the
    // connection closes); other connections are not touched.
    assert!(channel.channel_flow(ChannelFlowOptions { active: true }).await.expect("flow on"));
    let off = channel.channel_flow(ChannelFlowOptions { active: false }).await.unwrap_err();
    assert!(refusal(&off).contains("NOTIMPLEMENTED"), "{off:?}");
    assert!(!connection.status().connected());
    let (_connection, fresh) = open(&broker).await;
    declare(&fresh, "jobs", FieldTable::default()).await;
}

#[tokio::test]
async fn exclusive_queues_belong_to_their_connection_and_an_exclusive_consumer_holds_its_queue() {
    let broker = broker_with(&[]);
    let (owner, mine) = open(&broker).await;
    let exclusive = QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() };
    mine.queue_declare("private".into(), exclusive, FieldTable::default()).await.unwrap();
    publish(&mine, "private", "for me").await;

    // Another connection may not declare, consume, read, purge, bind or delete it: 405.
    let (_other, _) = open(&broker).await;
    type Attempt = for<'a> fn(&'a Channel) -> futures::future::BoxFuture<'a, lapin::Result<()>>;
    let attempts: [(&str, Attempt); 4] = [
        ("declare", |c| {
            Box::pin(async move {
                c.queue_declare("private".into(), QueueDeclareOptions::default(), FieldTable::default())
                    .await
                    .map(drop)
            })
        }),
        ("consume", |c| {
            Box::pin(async move { consume(c, "private", BasicConsumeOptions::default()).await.map(drop) })
        }),
        ("get", |c| {
            Box::pin(async move { c.basic_get("private".into(), Default::default()).await.map(drop) })
        }),
        ("delete", |c| {
            Box::pin(async move {
                c.queue_delete("private".into(), QueueDeleteOptions::default()).await.map(drop)
            })
        }),
    ];
    for (what, attempt) in attempts {
        let channel = _other.create_channel().await.unwrap();
        let refused = attempt(&channel).await.expect_err(what);
        assert!(refusal(&refused).contains("RESOURCELOCKED"), "{what}: {refused:?}");
    }
    let mut consumer = consume(&mine, "private", BasicConsumeOptions::default()).await.unwrap();
    assert_eq!(next(&mut consumer).await.data, b"for me");

    // An exclusive consumer: nobody else consumes while it is on (403), and it cannot start
    // beside another consumer.
    declare(&mine, "shared", FieldTable::default()).await;
    let sole = BasicConsumeOptions { exclusive: true, ..BasicConsumeOptions::default() };
    let holder = _other.create_channel().await.unwrap();
    let held = consume(&holder, "shared", sole).await.unwrap();
    let refused = consume(&mine, "shared", BasicConsumeOptions::default()).await.unwrap_err();
    assert!(refusal(&refused).contains("ACCESSREFUSED"), "{refused:?}");
    let mine = owner.create_channel().await.unwrap();
    holder.basic_cancel(held.tag(), Default::default()).await.unwrap();
    let _plain = consume(&mine, "shared", BasicConsumeOptions::default()).await.expect("free again");
    let late = _other.create_channel().await.unwrap();
    let refused = consume(&late, "shared", sole).await.unwrap_err();
    assert!(refusal(&refused).contains("ACCESSREFUSED"), "{refused:?}");

    // The owner goes, and its exclusive queue with it: the name is free for others.
    owner.close(200, "bye".into()).await.unwrap();
    let (_third, third) = open(&broker).await;
    let hopper = connect(&broker).await;
    eventually("the exclusive queue is deleted with its connection", DEADLINE, || async {
        hopper.queue_stats("private").await.is_err()
    })
    .await;
    third.queue_declare("private".into(), exclusive, FieldTable::default()).await.expect("declared anew");
}

#[tokio::test]
async fn a_queue_with_x_expires_goes_once_unused_but_not_while_it_has_a_consumer() {
    let broker = broker_with(&[]);
    let (_connection, channel) = open(&broker).await;
    let mut expiring = FieldTable::default();
    expiring.insert("x-expires".into(), AMQPValue::LongUInt(300));
    declare(&channel, "idle", expiring.clone()).await;
    declare(&channel, "busy", expiring.clone()).await;
    publish(&channel, "idle", "left behind").await;
    let busy = consume(&channel, "busy", BasicConsumeOptions::default()).await.unwrap();

    let hopper = connect(&broker).await;
    eventually("the unused queue expires", DEADLINE, || async { hopper.queue_stats("idle").await.is_err() })
        .await;
    // Three expiry periods with a consumer on: still there.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(hopper.queue_stats("busy").await.is_ok(), "a consumed queue does not expire");
    channel.basic_cancel(busy.tag(), Default::default()).await.unwrap();
    eventually("the queue expires once its consumer is gone", DEADLINE, || async {
        hopper.queue_stats("busy").await.is_err()
    })
    .await;

    let mut zero = FieldTable::default();
    zero.insert("x-expires".into(), AMQPValue::LongUInt(0));
    let refused =
        channel.queue_declare("never".into(), QueueDeclareOptions::default(), zero).await.unwrap_err();
    assert!(refusal(&refused).contains("PRECONDITIONFAILED"), "{refused:?}");
}

#[tokio::test]
async fn direct_reply_to_answers_an_rpc_without_a_reply_queue() {
    let broker = broker_with(&[]);
    let (_server, server) = open(&broker).await;
    declare(&server, "rpc", FieldTable::default()).await;
    let mut requests = consume(&server, "rpc", BasicConsumeOptions::default()).await.unwrap();

    let (client_connection, client) = open(&broker).await;
    let no_ack = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let mut replies = consume(&client, "amq.rabbitmq.reply-to", no_ack).await.unwrap();
    let request = BasicProperties::default()
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_correlation_id("call-1".into());
    publish_with(&client, "", "rpc", b"fib 10", request).await;

    let call = next(&mut requests).await;
    let reply_to = call.properties.reply_to().clone().expect("a reply address").to_string();
    assert!(reply_to.starts_with("amq.rabbitmq.reply-to.") && reply_to.len() > 30, "{reply_to}");
    let answer = BasicProperties::default().with_correlation_id("call-1".into());
    publish_with(&server, "", &reply_to, b"55", answer).await;
    call.ack(BasicAckOptions::default()).await.unwrap();

    let reply = next(&mut replies).await;
    assert_eq!(reply.data, b"55");
    assert_eq!(reply.properties.correlation_id().as_ref().map(|id| id.as_str()), Some("call-1"));
    let hopper = connect(&broker).await;
    assert!(hopper.queue_stats("amq.rabbitmq.reply-to").await.is_err(), "no queue is made for replies");

    // Once the caller is gone a reply to it is dropped, and the responder goes on.
    client_connection.close(200, "done".into()).await.unwrap();
    publish_with(&server, "", &reply_to, b"late", BasicProperties::default()).await;

    // A reply-to without a reply consumer on the channel, and a reply consumer that acks, are
    // refused with 406.
    let (_other, lonely) = open(&broker).await;
    let refused = lonely
        .basic_publish(
            "".into(),
            "rpc".into(),
            BasicPublishOptions::default(),
            b"?",
            BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .unwrap()
        .await;
    let closed =
        lonely.queue_declare("rpc".into(), QueueDeclareOptions::default(), FieldTable::default()).await;
    assert!(refused.is_err() || closed.is_err(), "the channel is closed: {refused:?} {closed:?}");
    let acking = _other.create_channel().await.unwrap();
    let refused =
        consume(&acking, "amq.rabbitmq.reply-to", BasicConsumeOptions::default()).await.unwrap_err();
    assert!(refusal(&refused).contains("PRECONDITIONFAILED"), "{refused:?}");
}

#[tokio::test]
async fn exchange_to_exchange_bindings_route_and_deleting_what_is_not_there_succeeds() {
    let broker = broker_with(&[]);
    let (_connection, channel) = open(&broker).await;
    let options = ExchangeDeclareOptions::default();
    channel
        .exchange_declare("front".into(), ExchangeKind::Fanout, options, FieldTable::default())
        .await
        .unwrap();
    channel
        .exchange_declare("orders".into(), ExchangeKind::Topic, options, FieldTable::default())
        .await
        .unwrap();
    channel
        .exchange_bind(
            "orders".into(),
            "front".into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange.bind");
    declare(&channel, "eu", FieldTable::default()).await;
    channel
        .queue_bind(
            "eu".into(),
            "orders".into(),
            "order.eu.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    publish_with(&channel, "front", "order.eu.paid", b"via two exchanges", BasicProperties::default()).await;
    publish_with(&channel, "front", "order.us.paid", b"nowhere", BasicProperties::default()).await;
    let mut consumer = consume(&channel, "eu", BasicConsumeOptions::default()).await.unwrap();
    assert_eq!(next(&mut consumer).await.data, b"via two exchanges");
    let stats = connect(&broker).await.queue_stats("eu").await.unwrap();
    assert_eq!(stats.published_total, 1, "{stats:?}");

    // As in RabbitMQ, deleting a queue or an exchange that is not there is not an error.
    channel.queue_delete("never-was".into(), QueueDeleteOptions::default()).await.expect("queue.delete");
    channel
        .exchange_delete("never-was".into(), ExchangeDeleteOptions::default())
        .await
        .expect("exchange.delete");
    declare(&channel, "still-open", FieldTable::default()).await;
}

/// An AMQPLAIN response: the LOGIN and PASSWORD entries of a field table, without its length.
fn amqplain(user: &str, password: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (key, value) in [("LOGIN", user), ("PASSWORD", password)] {
        bytes.push(key.len() as u8);
        bytes.extend_from_slice(key.as_bytes());
        bytes.push(b'S');
        bytes.extend_from_slice(&(value.len() as u32).to_be_bytes());
        bytes.extend_from_slice(value.as_bytes());
    }
    bytes
}

#[tokio::test]
async fn plain_and_amqplain_log_in_and_bad_logins_are_refused_with_403() {
    let broker = broker_with(&[]);
    let mut plain = AmqpRaw::connect(broker.amqp_addr()).await;
    let (start, ended) = plain.handshake("PLAIN", b"\0guest\0guest", 0).await;
    assert_eq!(start.mechanisms.to_string(), "PLAIN AMQPLAIN", "no EXTERNAL without TLS");
    assert!(is_open_ok(&ended), "{ended:?}");

    let mut amqplain_login = AmqpRaw::connect(broker.amqp_addr()).await;
    let (_, ended) = amqplain_login.handshake("AMQPLAIN", &amqplain("guest", "guest"), 0).await;
    assert!(is_open_ok(&ended), "{ended:?}");

    for (mechanism, response, says) in [
        ("AMQPLAIN", amqplain("guest", "wrong"), "authentication failed"),
        ("AMQPLAIN", b"\x05LOGINS\0\0".to_vec(), "AMQPLAIN response"),
        ("PLAIN", b"\0guest\0guest\0more".to_vec(), "PLAIN response"),
        ("EXTERNAL", Vec::new(), "EXTERNAL is not offered"),
        ("SCRAM-SHA-1", Vec::new(), "not offered"),
    ] {
        let mut raw = AmqpRaw::connect(broker.amqp_addr()).await;
        let (_, ended) = raw.handshake(mechanism, &response, 0).await;
        let (code, text) = connection_close(&ended).unwrap_or_else(|| panic!("{mechanism}: {ended:?}"));
        assert_eq!(code, 403, "{mechanism}: {text}");
        assert!(text.contains(says) || text.contains("not offered"), "{mechanism}: {text}");
    }
}

#[tokio::test]
async fn amqps_serves_tls_clients_and_logs_in_certificate_users_with_external() {
    let pki = Pki::new("amqps");
    let (cert, key) = pki.server();
    let broker = broker_with(&[
        "--amqps-listen",
        "127.0.0.1:0",
        "--tls-cert",
        path(&cert),
        "--tls-key",
        path(&key),
        "--tls-client-ca",
        path(&pki.ca_path()),
    ]);
    assert!(broker.stderr().contains("amqps listening on"), "{}", broker.stderr());
    connect(&broker).await.add_user("alice", "alice-pw", &[]).await.unwrap();

    let mut alice = AmqpRaw::connect_tls(broker.amqps_addr(), &pki, Some("alice")).await.expect("TLS");
    let (start, ended) = alice.handshake("EXTERNAL", b"", 0).await;
    assert_eq!(start.mechanisms.to_string(), "PLAIN AMQPLAIN EXTERNAL");
    assert!(is_open_ok(&ended), "{ended:?}");
    alice.method(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await.unwrap();
    assert!(matches!(alice.next_method().await, Some(AMQPFrame::Method(1, AMQPClass::Channel(_)))));
    // She is who the certificate says: her permissions apply. None yet, so 403.
    let declare =
        queue::Declare { queue: "over-tls".into(), arguments: RawTable::default(), ..Default::default() };
    alice.method(1, AMQPClass::Queue(queue::AMQPMethod::Declare(declare.clone()))).await.unwrap();
    let answer = alice.next_method().await;
    let refused = matches!(
        &answer,
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(close)))) if close.reply_code == 403
    );
    assert!(refused, "{answer:?}");
    let everything = Permissions { configure: ".*".into(), write: ".*".into(), read: ".*".into() };
    connect(&broker).await.set_permissions("alice", everything).await.unwrap();
    alice.method(2, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await.unwrap();
    assert!(matches!(alice.next_method().await, Some(AMQPFrame::Method(2, AMQPClass::Channel(_)))));
    alice.method(2, AMQPClass::Queue(queue::AMQPMethod::Declare(declare))).await.unwrap();
    let answer = alice.next_method().await;
    assert!(
        matches!(answer, Some(AMQPFrame::Method(2, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))))),
        "{answer:?}"
    );

    // A password over TLS works too; a certificate of a user who does not exist does not.
    let mut password = AmqpRaw::connect_tls(broker.amqps_addr(), &pki, Some("alice")).await.expect("TLS");
    assert!(is_open_ok(&password.handshake("PLAIN", b"\0alice\0alice-pw", 0).await.1));
    let mut mallory = AmqpRaw::connect_tls(broker.amqps_addr(), &pki, Some("mallory")).await.expect("TLS");
    let (_, ended) = mallory.handshake("EXTERNAL", b"", 0).await;
    let (code, text) = connection_close(&ended).expect("refused");
    assert!(code == 403 && text.contains("mallory"), "{code} {text}");
    let stats = connect(&broker).await.queue_stats("over-tls").await.expect("declared over AMQPS");
    assert_eq!(stats.ready, 0);
}

#[tokio::test]
async fn a_client_whose_heartbeats_stop_is_closed_and_others_go_on() {
    let broker = broker_with(&[]);
    let mut silent = AmqpRaw::connect(broker.amqp_addr()).await;
    let (_, ended) = silent.handshake("PLAIN", b"\0guest\0guest", 1).await;
    assert!(is_open_ok(&ended), "{ended:?}");
    // It sends nothing more. The broker's heartbeats come, then its close, within seconds.
    let mut heartbeats = 0;
    let close = loop {
        match silent.next().await {
            Some(AMQPFrame::Heartbeat) => heartbeats += 1,
            other => break other,
        }
    };
    let (code, text) = connection_close(&close).unwrap_or_else(|| panic!("{close:?}"));
    assert_eq!((code, text.as_str()), (320, "missed heartbeats from client"));
    assert!(heartbeats >= 1, "the broker sent heartbeats first");
    let (_connection, channel) = open(&broker).await;
    declare(&channel, "alive", FieldTable::default()).await;
}

#[tokio::test]
async fn a_blocked_publisher_is_told_and_held_and_nothing_it_sent_is_lost() {
    const BODY: usize = 4096;
    let broker = broker_with(&["--memory-high-watermark", "200000"]);
    let (publisher, channel) = open(&broker).await;
    declare(&channel, "flow", FieldTable::default()).await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();

    // Four times the watermark, published with confirms outstanding: the broker blocks the
    // connection part way (lapin then holds back what it has not sent yet).
    const COUNT: u32 = 200;
    let sender = channel.clone();
    let publishing = tokio::spawn(async move {
        let mut confirms = Vec::new();
        for n in 0..COUNT {
            let mut body = vec![b'.'; BODY];
            body[..4].copy_from_slice(&n.to_be_bytes());
            let options = BasicPublishOptions::default();
            let properties = BasicProperties::default();
            confirms.push(
                sender.basic_publish("".into(), "flow".into(), options, &body, properties).await.unwrap(),
            );
        }
        confirms
    });
    eventually("the publisher is told it is blocked", DEADLINE, || async { publisher.status().blocked() })
        .await;
    let hopper = connect(&broker).await;
    let status = hopper.status().await.unwrap();
    assert!(status.blocked.as_deref().is_some_and(|reason| reason.contains("memory")), "{status:?}");
    assert!(status.blocked_publishers >= 1, "{status:?}");

    // A consumer drains the queue; the block lifts, every held publish is taken and confirmed.
    let (_consumer_connection, consumer_channel) = open(&broker).await;
    consumer_channel.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume(&consumer_channel, "flow", BasicConsumeOptions::default()).await.unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < COUNT as usize {
        let delivery = next(&mut consumer).await;
        seen.insert(u32::from_be_bytes(delivery.data[..4].try_into().unwrap()));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(seen, (0..COUNT).collect::<BTreeSet<_>>(), "every message arrived once");
    for confirm in within("the rest of the publishes", publishing).await.unwrap() {
        let confirmation = within("a held publish's confirm", confirm).await.expect("confirmed");
        assert!(confirmation.is_ack(), "{confirmation:?}");
    }
    eventually("the publisher is unblocked", DEADLINE, || async { !publisher.status().blocked() }).await;
    assert_eq!(hopper.status().await.unwrap().blocked, None);
}

#[tokio::test]
async fn a_consumer_that_stops_reading_is_held_back_and_gets_everything_once_it_reads_again() {
    let broker = broker_with(&[]);
    let hopper = connect(&broker).await;
    let (_connection, channel) = open(&broker).await;
    declare(&channel, "bulk", FieldTable::default()).await;
    declare(&channel, "other", FieldTable::default()).await;

    // A raw consumer with no prefetch limit that reads nothing after its consume.
    let mut stuck = AmqpRaw::connect(broker.amqp_addr()).await;
    assert!(is_open_ok(&stuck.handshake("PLAIN", b"\0guest\0guest", 0).await.1));
    stuck.method(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await.unwrap();
    let subscribe = basic::Consume {
        queue: "bulk".into(),
        consumer_tag: "stuck".into(),
        no_ack: true,
        arguments: RawTable::default(),
        ..Default::default()
    };
    stuck.method(1, AMQPClass::Basic(basic::AMQPMethod::Consume(subscribe))).await.unwrap();

    // 16 MiB for it: far more than the broker buffers for one connection.
    const COUNT: usize = 256;
    let body = vec![b'x'; 64 * 1024];
    let confirms: Vec<_> =
        (0..COUNT).map(|_| hopper.publish("bulk", body.clone(), PublishOptions::default())).collect();
    for confirm in confirms {
        within("a publish confirm", confirm).await.expect("confirmed");
    }
    eventually("deliveries to the stuck consumer are held back", DEADLINE, || async {
        hopper.queue_stats("bulk").await.unwrap().ready > 0
    })
    .await;
    // Everyone else is served meanwhile.
    publish(&channel, "other", "served").await;
    let mut other = consume(&channel, "other", BasicConsumeOptions::default()).await.unwrap();
    assert_eq!(next(&mut other).await.data, b"served");

    // It reads again, and every message comes.
    let mut delivered = 0;
    while delivered < COUNT {
        let frame = stuck.next().await.expect("the connection stays open");
        if let AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(_))) = frame {
            delivered += 1;
        }
    }
    let stats = hopper.queue_stats("bulk").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 0), "{stats:?}");
}

#[tokio::test]
async fn hopper_bench_drives_the_amqp_listener_and_cleans_up_after_itself() {
    let broker = broker_with(&[]);
    let url = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr());
    for workload in [
        &["--count", "2000"][..],
        &["--count", "500", "--durable"],
        &["--count", "300", "--exchange", "fanout", "--queues", "3"],
        &["--count", "400", "--exchange", "topic", "--bindings", "50", "--json"],
        // Publishes only.
        &["--count", "300", "--durable", "--consumers", "0"],
    ] {
        let mut args = vec!["bench", "--amqp", url.as_str(), "--size", "64"];
        args.extend_from_slice(workload);
        let output = run_cli(&broker, &args).await;
        assert!(output.status.success(), "{workload:?}: {}", output.stderr);
        let sent: u64 = workload[1].parse().unwrap();
        let copies = match workload {
            _ if workload.contains(&"fanout") => 3,
            _ if workload.contains(&"0") => 0,
            _ => 1,
        };
        let received = if workload.contains(&"--json") {
            let report: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
            report["received"].as_u64().unwrap()
        } else {
            let line = output.stdout.lines().find(|l| l.starts_with("received:")).expect("a received line");
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        assert_eq!(received, sent * copies, "{workload:?}: {}", output.stdout);
    }
    let hopper = connect(&broker).await;
    assert!(hopper.list_queues().await.unwrap().is_empty(), "the bench's queues are deleted");

    // Three consuming connections, a queue each, as peerbench runs a fanout.
    let args = [
        "bench",
        "--amqp",
        &url,
        "--count",
        "200",
        "--exchange",
        "fanout",
        "--queues",
        "3",
        "--consumers",
        "3",
    ];
    let output = run_cli(&broker, &args).await;
    assert!(
        output.status.success() && output.stdout.contains("received:     600 messages (3 consumers"),
        "{}{}",
        output.stdout,
        output.stderr
    );
    let args = ["bench", "--amqp", &url, "--count", "10", "--consumers", "2"];
    let output = run_cli(&broker, &args).await;
    assert!(output.stderr.contains("--consumers 2 is more than the run's 1 queue(s)"), "{}", output.stderr);

    // Options it cannot honour over AMQP are refused, not ignored.
    let output = run_cli(&broker, &["bench", "--amqp", &url, "--rate", "100"]).await;
    assert!(
        !output.status.success() && output.stderr.contains("--amqp runs one producer"),
        "{}",
        output.stderr
    );
}

#[tokio::test]
async fn internal_exchanges_take_no_publishes_and_auto_delete_exchanges_go_with_their_last_binding() {
    let broker = broker_with(&[]);
    let (connection, channel) = open(&broker).await;
    let internal = ExchangeDeclareOptions { internal: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare("inside".into(), ExchangeKind::Fanout, internal, FieldTable::default())
        .await
        .unwrap();
    channel
        .exchange_declare("door".into(), ExchangeKind::Fanout, Default::default(), FieldTable::default())
        .await
        .unwrap();
    channel
        .exchange_bind(
            "inside".into(),
            "door".into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    declare(&channel, "behind", FieldTable::default()).await;
    channel
        .queue_bind(
            "behind".into(),
            "inside".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Through the exchange in front it routes; straight to it, 403.
    publish_with(&channel, "door", "", b"routed", BasicProperties::default()).await;
    let mut consumer = consume(&channel, "behind", BasicConsumeOptions::default()).await.unwrap();
    assert_eq!(next(&mut consumer).await.data, b"routed");
    // Straight to it, the channel is closed with 403 (raw frames: lapin may report only that
    // the channel is closing, depending on when its next method goes out).
    let mut direct = raw_open(&broker).await;
    let publish = basic::Publish { exchange: "inside".into(), ..Default::default() };
    direct.method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(publish))).await.unwrap();
    for frame in content(1, b"x") {
        direct.send(frame).await.unwrap();
    }
    let closed = direct.next_method().await;
    let refused = matches!(
        &closed,
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(close)))) if close.reply_code == 403
    );
    assert!(refused, "{closed:?}");

    // An auto-delete exchange stays while it never had a binding, and goes with its last.
    let hopper = connect(&broker).await;
    let auto = ExchangeDeclareOptions { auto_delete: true, ..ExchangeDeclareOptions::default() };
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare("brief".into(), ExchangeKind::Direct, auto, FieldTable::default())
        .await
        .unwrap();
    declare(&channel, "one", FieldTable::default()).await;
    declare(&channel, "two", FieldTable::default()).await;
    for queue in ["one", "two"] {
        channel
            .queue_bind(
                queue.into(),
                "brief".into(),
                "k".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    channel.queue_unbind("one".into(), "brief".into(), "k".into(), FieldTable::default()).await.unwrap();
    let names = |list: Vec<hopper_client::ExchangeInfo>| list.into_iter().map(|e| e.name).collect::<Vec<_>>();
    assert!(names(hopper.list_exchanges().await.unwrap()).contains(&"brief".to_owned()), "one binding left");
    channel.queue_delete("two".into(), QueueDeleteOptions::default()).await.unwrap();
    assert!(
        !names(hopper.list_exchanges().await.unwrap()).contains(&"brief".to_owned()),
        "its last binding went"
    );

    // Arguments Hopper cannot honour are refused, for exchanges and consumers too.
    let mut arguments = FieldTable::default();
    arguments.insert("x-delayed-type".into(), AMQPValue::LongString("direct".into()));
    let refused = channel
        .exchange_declare("odd".into(), ExchangeKind::Direct, Default::default(), arguments)
        .await
        .unwrap_err();
    assert!(refusal(&refused).contains("PRECONDITIONFAILED"), "{refused:?}");
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-priority".into(), AMQPValue::LongInt(5));
    let refused = channel
        .basic_consume("one".into(), "".into(), BasicConsumeOptions::default(), arguments)
        .await
        .unwrap_err();
    assert!(refusal(&refused).contains("PRECONDITIONFAILED"), "{refused:?}");
}

/// A raw connection, logged in, with channel 1 open.
async fn raw_open(broker: &Broker) -> AmqpRaw {
    let mut raw = AmqpRaw::connect(broker.amqp_addr()).await;
    assert!(is_open_ok(&raw.handshake("PLAIN", b"\0guest\0guest", 0).await.1));
    raw.method(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await.unwrap();
    assert!(matches!(raw.next_method().await, Some(AMQPFrame::Method(1, AMQPClass::Channel(_)))));
    raw
}

fn publish_frame(channel: u16, queue: &str) -> AMQPFrame {
    let publish = basic::Publish { routing_key: queue.into(), ..Default::default() };
    AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::Publish(publish)))
}

#[tokio::test]
async fn hostile_frames_close_what_they_came_on_and_nobody_else_notices() {
    use amq_protocol::frame::AMQPContentHeader;
    let broker = broker_with(&[]);
    let (_connection, bystander) = open(&broker).await;
    declare(&bystander, "calm", FieldTable::default()).await;

    // A content announced larger than the broker takes: its channel closes (406) before any of
    // it is gathered, and the connection goes on.
    let mut huge = raw_open(&broker).await;
    huge.send(publish_frame(1, "calm")).await.unwrap();
    let header = AMQPContentHeader { class_id: 60, body_size: u64::MAX, properties: Default::default() };
    huge.send(AMQPFrame::Header(1, header)).await.unwrap();
    let answer = huge.next_method().await;
    let closed = matches!(
        &answer,
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(close))))
            if close.reply_code == 406 && close.reply_text.as_str().contains("larger than the broker's maximum")
    );
    assert!(closed, "{answer:?}");
    huge.send(AMQPFrame::Body(1, vec![0; 1000])).await.unwrap();
    huge.method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))).await.unwrap();
    huge.method(2, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await.unwrap();
    assert!(matches!(huge.next_method().await, Some(AMQPFrame::Method(2, AMQPClass::Channel(_)))));

    // A body with no publish before it, a frame over the agreed size, and bytes that are no
    // frame: each closes its connection with the code for it.
    let mut orphan = raw_open(&broker).await;
    orphan.send(AMQPFrame::Body(1, b"stray".to_vec())).await.unwrap();
    assert_eq!(connection_close(&orphan.next_method().await).map(|(code, _)| code), Some(505));
    let mut oversize = raw_open(&broker).await;
    let mut frame = vec![3u8, 0, 1];
    frame.extend_from_slice(&(4 * 1024 * 1024u32).to_be_bytes());
    oversize.send_bytes(&frame).await.unwrap();
    assert_eq!(connection_close(&oversize.next_method().await).map(|(code, _)| code), Some(501));
    let mut garbage = raw_open(&broker).await;
    garbage.send_bytes(&[1, 0, 1, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0xce]).await.unwrap();
    assert_eq!(connection_close(&garbage.next_method().await).map(|(code, _)| code), Some(501));

    // A publish whose fields end before its frame does, and a body frame without its end
    // marker: 501 too.
    let encoded = |frame: &AMQPFrame| {
        use amq_protocol::frame::{gen_frame, WriteContext};
        gen_frame(frame)(WriteContext::from(Vec::new())).unwrap().write
    };
    let mut long = raw_open(&broker).await;
    let mut bytes = encoded(&publish_frame(1, "calm"));
    let size = u32::from_be_bytes(bytes[3..7].try_into().unwrap()) + 1;
    bytes[3..7].copy_from_slice(&size.to_be_bytes());
    bytes.insert(bytes.len() - 1, 0);
    long.send_bytes(&bytes).await.unwrap();
    assert_eq!(connection_close(&long.next_method().await).map(|(code, _)| code), Some(501));
    let mut unended = raw_open(&broker).await;
    unended.send(publish_frame(1, "calm")).await.unwrap();
    let [header, body] = content(1, b"lost");
    unended.send(header).await.unwrap();
    let mut bytes = encoded(&body);
    *bytes.last_mut().unwrap() = 0;
    unended.send_bytes(&bytes).await.unwrap();
    assert_eq!(connection_close(&unended.next_method().await).map(|(code, _)| code), Some(501));

    // A body in several frames arrives whole.
    let mut pieces = raw_open(&broker).await;
    pieces.send(publish_frame(1, "calm")).await.unwrap();
    let [header, _] = content(1, b"in three pieces");
    pieces.send(header).await.unwrap();
    for part in [&b"in "[..], b"three", b" pieces"] {
        pieces.send(AMQPFrame::Body(1, part.to_vec())).await.unwrap();
    }
    let mut consumer = consume(&bystander, "calm", BasicConsumeOptions::default()).await.unwrap();
    assert_eq!(next(&mut consumer).await.data, b"in three pieces");
    drop(pieces);

    // The bystander saw none of it.
    publish(&bystander, "calm", "still here").await;
    assert_eq!(next(&mut consumer).await.data, b"still here");
}

/// The content frames of a publish of `body` on `channel`, persistent.
fn content(channel: u16, body: &[u8]) -> [AMQPFrame; 2] {
    use amq_protocol::frame::AMQPContentHeader;
    let properties = lapin::BasicProperties::default().with_delivery_mode(2);
    let header = AMQPContentHeader { class_id: 60, body_size: body.len() as u64, properties };
    [AMQPFrame::Header(channel, header), AMQPFrame::Body(channel, body.to_vec())]
}

/// Sends `method` on `channel` and returns the next method, on whatever channel.
async fn ask(raw: &mut AmqpRaw, channel: u16, method: AMQPClass) -> Option<AMQPFrame> {
    raw.method(channel, method).await.unwrap();
    raw.next_method().await
}

fn is_method(frame: &Option<AMQPFrame>, on: u16, class: u16, method: u16) -> bool {
    matches!(frame, Some(AMQPFrame::Method(channel, m))
        if *channel == on && m.get_amqp_class_id() == class && m.get_amqp_method_id() == method)
}

#[tokio::test]
async fn nothing_follows_a_channel_close_and_deliveries_of_a_deleted_queue_can_still_be_acked() {
    let broker = broker_with(&[]);
    let hopper = connect(&broker).await;
    let (_connection, bystander) = open(&broker).await;

    // A queue deleted under its consumer: the consumer is cancelled, and what it was delivered
    // is still acked without a fuss, as in RabbitMQ.
    declare(&bystander, "doomed", FieldTable::default()).await;
    publish(&bystander, "doomed", "last words").await;
    let (_other, channel) = open(&broker).await;
    let mut consumer = consume(&channel, "doomed", BasicConsumeOptions::default()).await.unwrap();
    let delivery = next(&mut consumer).await;
    bystander.queue_delete("doomed".into(), QueueDeleteOptions::default()).await.unwrap();
    assert!(within("the consumer's cancel", consumer.next()).await.is_none(), "cancelled");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    declare(&channel, "after", FieldTable::default()).await;

    // A consumer its client cancelled while it held a delivery: its queue deleted then sends
    // no basic.cancel for it, the client ended it already; the delivery is still acked.
    let mut raw = raw_open(&broker).await;
    let consume = |queue: &str| {
        let consume = basic::Consume { queue: queue.into(), consumer_tag: "c".into(), ..Default::default() };
        AMQPClass::Basic(basic::AMQPMethod::Consume(consume))
    };
    let cancel = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
        consumer_tag: "c".into(),
        nowait: false,
    }));
    declare(&bystander, "dropped", FieldTable::default()).await;
    publish(&bystander, "dropped", "held").await;
    assert!(is_method(&ask(&mut raw, 1, consume("dropped")).await, 1, 60, 21));
    assert!(is_method(&raw.next_method().await, 1, 60, 60), "the delivery");
    assert!(matches!(raw.next().await, Some(AMQPFrame::Header(1, _))));
    assert!(matches!(raw.next().await, Some(AMQPFrame::Body(1, _))));
    assert!(is_method(&ask(&mut raw, 1, cancel.clone()).await, 1, 60, 31));
    bystander.queue_delete("dropped".into(), QueueDeleteOptions::default()).await.unwrap();
    let ack =
        |tag| AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: tag, multiple: false }));
    raw.method(1, ack(1)).await.unwrap();
    let qos =
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: 5, ..Default::default() }));
    let answer = ask(&mut raw, 1, qos.clone()).await;
    assert!(is_method(&answer, 1, 60, 11), "qos-ok, with no cancel or close before it: {answer:?}");

    // An auto-delete queue whose last consumer is cancelled holding a delivery goes once that
    // is settled.
    let auto = queue::Declare { queue: "brief".into(), auto_delete: true, ..Default::default() };
    let declared = ask(&mut raw, 1, AMQPClass::Queue(queue::AMQPMethod::Declare(auto))).await;
    assert!(is_method(&declared, 1, 50, 11), "{declared:?}");
    publish(&bystander, "brief", "held").await;
    assert!(is_method(&ask(&mut raw, 1, consume("brief")).await, 1, 60, 21));
    assert!(is_method(&raw.next_method().await, 1, 60, 60), "the delivery");
    assert!(matches!(raw.next().await, Some(AMQPFrame::Header(1, _))));
    assert!(matches!(raw.next().await, Some(AMQPFrame::Body(1, _))));
    assert!(is_method(&ask(&mut raw, 1, cancel).await, 1, 60, 31));
    let brief = || async { hopper.list_queues().await.unwrap().iter().any(|q| q.name == "brief") };
    assert!(brief().await, "its delivery is not settled yet");
    raw.method(1, ack(2)).await.unwrap();
    eventually("the auto-delete queue goes", DEADLINE, || async { !brief().await }).await;
    let answer = ask(&mut raw, 1, qos).await;
    assert!(is_method(&answer, 1, 60, 11), "and sends nothing: {answer:?}");

    // A durable publish whose channel closes before its confirm: the confirm is never sent,
    // since a client forgets a channel at its close-ok and fails on a frame naming it after.
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    bystander.queue_declare("kept".into(), durable, FieldTable::default()).await.unwrap();
    for channel in [2, 3] {
        assert!(is_method(
            &ask(&mut raw, channel, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await,
            channel,
            20,
            11
        ));
        let select =
            AMQPClass::Confirm(amq_protocol::protocol::confirm::AMQPMethod::Select(Default::default()));
        assert!(is_method(&ask(&mut raw, channel, select).await, channel, 85, 11));
    }
    raw.send(publish_frame(2, "kept")).await.unwrap();
    for frame in content(2, b"first") {
        raw.send(frame).await.unwrap();
    }
    let close = channel::Close { reply_code: 200, reply_text: "bye".into(), class_id: 0, method_id: 0 };
    raw.method(2, AMQPClass::Channel(channel::AMQPMethod::Close(close))).await.unwrap();
    loop {
        match raw.next_method().await {
            // The confirm may come before the close-ok.
            frame if is_method(&frame, 2, 60, 80) => continue,
            frame => {
                assert!(is_method(&frame, 2, 20, 41), "close-ok: {frame:?}");
                break;
            }
        }
    }
    // A later publish's confirm comes after the first's would have: by then, nothing came
    // for channel 2.
    raw.send(publish_frame(3, "kept")).await.unwrap();
    for frame in content(3, b"second") {
        raw.send(frame).await.unwrap();
    }
    let confirm = raw.next_method().await;
    assert!(is_method(&confirm, 3, 60, 80), "the second publish's confirm, alone: {confirm:?}");
    assert_eq!(hopper.queue_stats("kept").await.unwrap().ready, 2, "both publishes were taken");
}
