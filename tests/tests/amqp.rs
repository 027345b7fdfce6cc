//! RabbitMQ's tutorials, run with lapin (the Rust AMQP 0-9-1 client) against Hopper's AMQP
//! listener, and the same messages seen from Hopper's own protocol.

use std::time::Duration;

use futures::StreamExt;
use hopper_tests::{connect, Broker};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

fn broker() -> Broker {
    Broker::start_with(&["--amqp-listen", "127.0.0.1:0"])
}

async fn open(broker: &Broker) -> (Connection, Channel) {
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr());
    let connection =
        Connection::connect(&uri, ConnectionProperties::default()).await.expect("connect over AMQP");
    let channel = connection.create_channel().await.expect("open a channel");
    (connection, channel)
}

async fn publish(channel: &Channel, exchange: &str, key: &str, body: &str) {
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("publish confirm");
}

async fn next_body(consumer: &mut lapin::Consumer) -> String {
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer goes on")
        .expect("a delivery");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    String::from_utf8(delivery.data.clone()).expect("UTF-8")
}

async fn consumer(channel: &Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume")
}

#[tokio::test]
async fn hello_world_and_work_queues() {
    let broker = broker();
    let (_connection, channel) = open(&broker).await;
    channel
        .queue_declare("hello".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    publish(&channel, "", "hello", "Hello World!").await;
    let mut hello = consumer(&channel, "hello").await;
    assert_eq!(next_body(&mut hello).await, "Hello World!");

    // Work queues: a durable queue, fair dispatch with a prefetch of 1, acks.
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare("task_queue".into(), durable, FieldTable::default()).await.unwrap();
    let (_other, worker_channel) = open(&broker).await;
    worker_channel.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut worker = consumer(&worker_channel, "task_queue").await;
    for n in 0..5 {
        publish(&channel, "", "task_queue", &format!("task {n}")).await;
    }
    for n in 0..5 {
        assert_eq!(next_body(&mut worker).await, format!("task {n}"));
    }
    let stats = connect(&broker).await.queue_stats("task_queue").await.unwrap();
    assert!(stats.durable, "{stats:?}");
    assert_eq!((stats.ready, stats.unacked, stats.acked_total), (0, 0, 5), "{stats:?}");
}

#[tokio::test]
async fn publish_subscribe_routing_and_topics() {
    let broker = broker();
    let (_connection, channel) = open(&broker).await;
    // Publish/subscribe: a fanout exchange, server-named queues.
    channel
        .exchange_declare(
            "logs".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut subscribers = Vec::new();
    for _ in 0..2 {
        let queue = channel
            .queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        assert!(queue.name().as_str().starts_with("amq.gen-"), "{:?}", queue.name());
        channel
            .queue_bind(
                queue.name().clone(),
                "logs".into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        subscribers.push(consumer(&channel, queue.name().as_str()).await);
    }
    publish(&channel, "logs", "", "to everyone").await;
    for subscriber in &mut subscribers {
        assert_eq!(next_body(subscriber).await, "to everyone");
    }

    // Routing and topics.
    for (exchange, kind, binding, hit, miss) in [
        ("direct_logs", ExchangeKind::Direct, "error", "error", "info"),
        ("topic_logs", ExchangeKind::Topic, "kern.*", "kern.critical", "cron.critical"),
    ] {
        channel
            .exchange_declare(exchange.into(), kind, ExchangeDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        let queue = channel
            .queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        publish(&channel, exchange, miss, "not for us").await;
        publish(&channel, exchange, hit, "for us").await;
        let mut receiver = consumer(&channel, queue.name().as_str()).await;
        assert_eq!(next_body(&mut receiver).await, "for us", "{exchange}");
        let stats = connect(&broker).await.queue_stats(queue.name().as_str()).await.unwrap();
        assert_eq!(stats.published_total, 1, "{exchange}: {stats:?}");
    }
}

#[tokio::test]
async fn confirms_properties_and_hopper_clients_see_the_same_messages() {
    let broker = broker();
    let (_connection, channel) = open(&broker).await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    channel.queue_declare("rpc".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let properties = BasicProperties::default()
        .with_correlation_id("c-1".into())
        .with_reply_to("callbacks".into())
        .with_content_type("application/json".into());
    let confirm = channel
        .basic_publish("".into(), "rpc".into(), BasicPublishOptions::default(), b"{\"n\": 30}", properties)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");

    // A Hopper consumer gets it, properties as headers.
    let hopper = connect(&broker).await;
    let mut from_hopper = hopper.consume("rpc", Default::default()).await.unwrap();
    let delivery = hopper_tests::next_delivery(&mut from_hopper).await;
    assert_eq!(hopper_tests::body_text(&delivery), "{\"n\": 30}");
    assert_eq!(delivery.content_type, "application/json");
    assert_eq!(delivery.headers["amqp-correlation-id"], "c-1");
    delivery.ack().await.unwrap();
    from_hopper.cancel().await.unwrap();

    // A Hopper publisher's message reaches a lapin consumer, properties restored.
    let mut headers = std::collections::HashMap::new();
    headers.insert("amqp-correlation-id".to_string(), "c-2".to_string());
    headers.insert("tenant".to_string(), "acme".to_string());
    let options = hopper_client::PublishOptions { headers, ..Default::default() };
    hopper.publish("rpc", "from hopper", options).await.unwrap();
    let mut from_lapin = consumer(&channel, "rpc").await;
    let delivery =
        tokio::time::timeout(Duration::from_secs(10), from_lapin.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(delivery.data, b"from hopper");
    assert_eq!(delivery.properties.correlation_id().as_ref().map(|s| s.as_str()), Some("c-2"));
    let table = delivery.properties.headers().as_ref().expect("headers");
    assert!(table.inner().keys().any(|key| key.as_str() == "tenant"), "{table:?}");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
}

#[tokio::test]
async fn refusals_close_the_channel_with_rabbitmqs_codes_and_bad_clients_do_not_hurt_others() {
    let broker = broker();
    let (connection, channel) = open(&broker).await;
    // A queue that does not exist: 404 on the channel; the connection goes on.
    let missing = channel
        .basic_consume("nowhere".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert!(format!("{missing:?}").contains("Soft(NOTFOUND)"), "{missing:?}");
    // An argument Hopper cannot honour: 406.
    let other = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-priority".into(), lapin::types::AMQPValue::ShortShortUInt(10));
    let refused =
        other.queue_declare("q".into(), QueueDeclareOptions::default(), arguments).await.unwrap_err();
    assert!(format!("{refused:?}").contains("Soft(PRECONDITIONFAILED)"), "{refused:?}");
    assert!(format!("{refused:?}").contains("x-max-priority"), "{refused:?}");

    // A wrong password is refused.
    let uri = format!("amqp://guest:wrong@{}/%2f", broker.amqp_addr());
    assert!(Connection::connect(&uri, ConnectionProperties::default()).await.is_err());

    // Bytes that are not AMQP get the protocol header this broker speaks, and the door shut.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(broker.amqp_addr()).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert_eq!(answer, b"AMQP\x00\x00\x09\x01");

    // And everyone else is still served.
    let (_connection, fresh) = open(&broker).await;
    fresh.queue_declare("still".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    publish(&fresh, "", "still", "served").await;
    let mut receiver = consumer(&fresh, "still").await;
    assert_eq!(next_body(&mut receiver).await, "served");
}

#[tokio::test]
async fn a_no_ack_consumer_settles_nothing_and_the_queue_forgets_what_it_got() {
    let broker = broker();
    let (_connection, channel) = open(&broker).await;
    channel
        .queue_declare("fire".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for n in 0..20 {
        publish(&channel, "", "fire", &format!("m{n}")).await;
    }
    let options = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let mut consumer =
        channel.basic_consume("fire".into(), "".into(), options, FieldTable::default()).await.unwrap();
    for n in 0..20 {
        let delivery =
            tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(delivery.data, format!("m{n}").as_bytes());
    }
    let hopper = connect(&broker).await;
    hopper_tests::eventually("every delivery is acked by the broker", Duration::from_secs(10), || async {
        let stats = hopper.queue_stats("fire").await.unwrap();
        stats.acked_total == 20 && stats.unacked == 0 && stats.ready == 0
    })
    .await;
}

#[tokio::test]
async fn basic_get_takes_one_message_at_a_time_and_says_when_the_queue_is_empty() {
    let broker = broker();
    let (_connection, channel) = open(&broker).await;
    channel
        .queue_declare("polled".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    publish(&channel, "", "polled", "first").await;
    publish(&channel, "", "polled", "second").await;
    let first = channel
        .basic_get("polled".into(), lapin::options::BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.delivery.data, b"first");
    assert_eq!(first.message_count, 1);
    first.delivery.ack(BasicAckOptions::default()).await.unwrap();
    let no_ack = lapin::options::BasicGetOptions { no_ack: true };
    let second = channel.basic_get("polled".into(), no_ack).await.unwrap().unwrap();
    assert_eq!(second.delivery.data, b"second");
    assert!(channel.basic_get("polled".into(), no_ack).await.unwrap().is_none());
    let stats = connect(&broker).await.queue_stats("polled").await.unwrap();
    assert_eq!((stats.ready, stats.unacked, stats.acked_total), (0, 0, 2), "{stats:?}");
}

#[tokio::test]
async fn rpc_with_a_callback_queue_reply_to_and_correlation_id() {
    let broker = broker();
    let (_server_connection, server) = open(&broker).await;
    server
        .queue_declare("rpc_queue".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    server.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut requests = consumer(&server, "rpc_queue").await;
    // The server: answers fib(n) to each request's reply-to queue, with its correlation id.
    let serving = tokio::spawn(async move {
        while let Some(Ok(request)) = requests.next().await {
            let n: u64 = String::from_utf8_lossy(&request.data).parse().unwrap();
            let (mut a, mut b) = (0u64, 1u64);
            for _ in 0..n {
                (a, b) = (b, a + b);
            }
            let reply_to = request.properties.reply_to().clone().unwrap();
            let correlation = request.properties.correlation_id().clone().unwrap();
            server
                .basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    a.to_string().as_bytes(),
                    BasicProperties::default().with_correlation_id(correlation),
                )
                .await
                .unwrap();
            request.ack(BasicAckOptions::default()).await.unwrap();
        }
    });

    let (_client_connection, client) = open(&broker).await;
    let callback =
        client.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let mut replies = consumer(&client, callback.name().as_str()).await;
    for (n, expected) in [(10, "55"), (30, "832040")] {
        let id = format!("call-{n}");
        let properties = BasicProperties::default()
            .with_reply_to(callback.name().clone())
            .with_correlation_id(id.as_str().into());
        client
            .basic_publish(
                "".into(),
                "rpc_queue".into(),
                BasicPublishOptions::default(),
                n.to_string().as_bytes(),
                properties,
            )
            .await
            .unwrap();
        let reply =
            tokio::time::timeout(Duration::from_secs(10), replies.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(reply.properties.correlation_id().as_ref().map(|s| s.as_str()), Some(id.as_str()));
        assert_eq!(reply.data, expected.as_bytes());
        reply.ack(BasicAckOptions::default()).await.unwrap();
    }
    serving.abort();
}

#[tokio::test]
async fn unroutable_mandatory_messages_come_back_and_exclusive_and_auto_delete_queues_go() {
    let broker = broker();
    let (connection, channel) = open(&broker).await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    channel
        .exchange_declare(
            "nowhere".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mandatory = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
    let confirm = channel
        .basic_publish("nowhere".into(), "key".into(), mandatory, b"lost?", BasicProperties::default())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let returned = confirm.take_message().expect("the message came back");
    assert_eq!(returned.data, b"lost?");
    assert_eq!(returned.reply_code, 312);

    // An exclusive queue goes with its connection; an auto-delete queue with its last consumer.
    let hopper = connect(&broker).await;
    let exclusive = QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() };
    let mine = channel.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap();
    let auto = QueueDeclareOptions { auto_delete: true, ..QueueDeclareOptions::default() };
    channel.queue_declare("transient".into(), auto, FieldTable::default()).await.unwrap();
    let consumer = consumer(&channel, "transient").await;
    channel.basic_cancel(consumer.tag(), lapin::options::BasicCancelOptions::default()).await.unwrap();
    hopper_tests::eventually(
        "the auto-delete queue goes with its last consumer",
        Duration::from_secs(10),
        || async { hopper.queue_stats("transient").await.is_err() },
    )
    .await;
    assert!(hopper.queue_stats(mine.name().as_str()).await.is_ok());
    connection.close(200, "bye".into()).await.unwrap();
    hopper_tests::eventually(
        "the exclusive queue goes with its connection",
        Duration::from_secs(10),
        || async { hopper.queue_stats(mine.name().as_str()).await.is_err() },
    )
    .await;
}

#[tokio::test]
async fn a_dead_lettered_message_carries_rabbitmqs_x_death_header() {
    let broker = broker();
    let (_connection, channel) = open(&broker).await;
    channel
        .queue_declare("jobs.dead".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-hopper-dead-letter".into(), lapin::types::AMQPValue::LongString("jobs.dead".into()));
    channel.queue_declare("jobs".into(), QueueDeclareOptions::default(), arguments).await.unwrap();
    publish(&channel, "", "jobs", "poison").await;
    let mut jobs = consumer(&channel, "jobs").await;
    let delivery =
        tokio::time::timeout(Duration::from_secs(10), jobs.next()).await.unwrap().unwrap().unwrap();
    delivery.reject(lapin::options::BasicRejectOptions { requeue: false }).await.unwrap();

    let mut dead = consumer(&channel, "jobs.dead").await;
    let died = tokio::time::timeout(Duration::from_secs(10), dead.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(died.data, b"poison");
    let headers = died.properties.headers().as_ref().expect("headers");
    let x_death = headers.inner().iter().find(|(key, _)| key.as_str() == "x-death").map(|(_, value)| value);
    let Some(lapin::types::AMQPValue::FieldArray(rows)) = x_death else { panic!("no x-death: {headers:?}") };
    let Some(lapin::types::AMQPValue::FieldTable(row)) = rows.as_slice().first() else { panic!("{rows:?}") };
    let field =
        |name: &str| row.inner().iter().find(|(key, _)| key.as_str() == name).map(|(_, value)| value.clone());
    assert_eq!(field("queue"), Some(lapin::types::AMQPValue::LongString("jobs".into())));
    assert_eq!(field("reason"), Some(lapin::types::AMQPValue::LongString("rejected".into())));
    assert_eq!(field("count"), Some(lapin::types::AMQPValue::LongLongInt(1)));
}
