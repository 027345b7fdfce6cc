"""RabbitMQ's six tutorials, written with pika as the tutorials write them, run against Hopper.

    python tutorials.py SCENARIO amqp://guest:guest@HOST:PORT/%2F
"""

import threading
import uuid

import pika

from common import (
    TIMEOUT,
    bodies,
    connect,
    exists,
    expect_equal,
    main,
    ready,
    receive,
    wait_until,
)


def hello_world(url):
    """Tutorial 1: a queue, a publish to the default exchange, a consumer."""
    connection = connect(url)
    channel = connection.channel()
    channel.queue_declare(queue="hello")
    channel.basic_publish(exchange="", routing_key="hello", body="Hello World!")
    got = receive(channel, "hello", 1, auto_ack=True)
    expect_equal("the body", bodies(got), ["Hello World!"])
    expect_equal("the queue afterwards", ready(channel, "hello"), 0)
    connection.close()


def work_queues(url):
    """Tutorial 2: a durable queue, persistent messages, two workers with a prefetch of 1 and
    manual acks: each holds one unacked message at a time, the rest wait in the queue."""
    connection = connect(url)
    producer = connection.channel()
    producer.confirm_delivery()
    producer.queue_declare(queue="task_queue", durable=True)
    for n in range(4):
        producer.basic_publish(
            exchange="",
            routing_key="task_queue",
            body=f"task {n}",
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
        )

    # Redeclaring it with other flags is refused, as in RabbitMQ: it is still durable.
    probe = connection.channel()
    try:
        probe.queue_declare(queue="task_queue", durable=False)
        raise AssertionError("redeclaring a durable queue as transient was accepted")
    except pika.exceptions.ChannelClosedByBroker as closed:
        expect_equal("the reply code", closed.reply_code, 406)

    received = {"a": [], "b": []}
    channels = {}
    for name in received:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)

        def on_message(channel, method, properties, body, name=name):
            received[name].append((method.delivery_tag, body.decode()))

        channel.basic_consume(queue="task_queue", on_message_callback=on_message)
        channels[name] = channel

    # Each worker gets one task and no more until it acks it.
    wait_until("a task for each worker", lambda: all(received.values()), connection)
    expect_equal("tasks held by worker a", len(received["a"]), 1)
    expect_equal("tasks held by worker b", len(received["b"]), 1)
    expect_equal("tasks still waiting", ready(producer, "task_queue"), 2)

    done = []
    while len(done) < 4:
        for name, tasks in received.items():
            if tasks:
                tag, body = tasks.pop(0)
                channels[name].basic_ack(tag)
                done.append(body)
        wait_until("the next tasks", lambda: len(done) == 4 or any(received.values()), connection)
    expect_equal("the tasks done", sorted(done), [f"task {n}" for n in range(4)])
    expect_equal("the queue afterwards", ready(producer, "task_queue"), 0)
    connection.close()


def publish_subscribe(url):
    """Tutorial 3: a fanout exchange; each subscriber binds its own server-named exclusive
    queue, and gets every message. The queues go with their connection."""
    publisher = connect(url)
    channel = publisher.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange="logs", exchange_type="fanout")

    subscribers = []
    for _ in range(2):
        connection = connect(url)
        sub = connection.channel()
        queue = sub.queue_declare(queue="", exclusive=True).method.queue
        if not queue.startswith("amq.gen-"):
            raise AssertionError(f"a server-named queue is called {queue!r}")
        sub.queue_bind(exchange="logs", queue=queue)
        subscribers.append((connection, sub, queue))
    if subscribers[0][2] == subscribers[1][2]:
        raise AssertionError(f"two server-named queues share the name {subscribers[0][2]!r}")

    lines = ["info: up", "warning: disk", "error: down"]
    for line in lines:
        channel.basic_publish(exchange="logs", routing_key="", body=line)
    for _, sub, queue in subscribers:
        expect_equal(f"what {queue} got", bodies(receive(sub, queue, 3)), lines)

    gone_connection, _, gone = subscribers.pop()
    gone_connection.close()
    # The broker deletes it before it answers the close.
    expect_equal(f"the exclusive queue {gone} once its connection is closed", exists(publisher, gone), False)
    for connection, _, _ in subscribers:
        connection.close()
    publisher.close()


def routing(url):
    """Tutorial 4: a direct exchange; a queue bound with one severity gets only those, one
    bound with three gets all three."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange="direct_logs", exchange_type="direct")
    errors = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(exchange="direct_logs", queue=errors, routing_key="error")
    everything = channel.queue_declare(queue="", exclusive=True).method.queue
    for severity in ["info", "warning", "error"]:
        channel.queue_bind(exchange="direct_logs", queue=everything, routing_key=severity)

    for severity in ["info", "warning", "error", "debug"]:
        channel.basic_publish(exchange="direct_logs", routing_key=severity, body=f"{severity}: hi")
    # Confirmed publishes are in their queues: the counts are exact.
    expect_equal("waiting in the error queue", ready(channel, errors), 1)
    expect_equal("waiting in the all-severities queue", ready(channel, everything), 3)
    expect_equal("the error queue", bodies(receive(channel, errors, 1)), ["error: hi"])
    expect_equal(
        "the all-severities queue",
        bodies(receive(channel, everything, 3)),
        ["info: hi", "warning: hi", "error: hi"],
    )
    connection.close()


def topics(url):
    """Tutorial 5: a topic exchange with the tutorial's bindings and routing keys."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange="topic_logs", exchange_type="topic")
    bindings = {"q1": ["*.orange.*"], "q2": ["*.*.rabbit", "lazy.#"], "all": ["#"]}
    queues = {}
    for name, keys in bindings.items():
        queues[name] = channel.queue_declare(queue="", exclusive=True).method.queue
        for key in keys:
            channel.queue_bind(exchange="topic_logs", queue=queues[name], routing_key=key)
    keys = [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "lazy.brown.fox",
        "lazy.pink.rabbit",
        "quick.brown.fox",
        "orange",
        "quick.orange.male.rabbit",
        "lazy.orange.male.rabbit",
        "lazy",
    ]
    for key in keys:
        channel.basic_publish(exchange="topic_logs", routing_key=key, body=key)
    expected = {
        "q1": ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox"],
        # lazy.pink.rabbit matches both of q2's bindings and still arrives once.
        "q2": [
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "lazy.brown.fox",
            "lazy.pink.rabbit",
            "lazy.orange.male.rabbit",
            "lazy",
        ],
        "all": keys,
    }
    for name, wanted in expected.items():
        expect_equal(f"waiting in {name}", ready(channel, queues[name]), len(wanted))
        expect_equal(f"what {name} got", bodies(receive(channel, queues[name], len(wanted))), wanted)
    connection.close()


def rpc(url):
    """Tutorial 6: an RPC server answering fib(n) on rpc_queue to each request's reply_to with
    its correlation_id; the client waits on its exclusive callback queue."""
    server_connection = connect(url)
    server = server_connection.channel()
    server.queue_declare(queue="rpc_queue")
    server.basic_qos(prefetch_count=1)

    def fib(n):
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    def on_request(channel, method, properties, body):
        answer = str(fib(int(body)))
        channel.basic_publish(
            exchange="",
            routing_key=properties.reply_to,
            properties=pika.BasicProperties(correlation_id=properties.correlation_id),
            body=answer,
        )
        channel.basic_ack(delivery_tag=method.delivery_tag)

    server.basic_consume(queue="rpc_queue", on_message_callback=on_request)
    serving = threading.Thread(target=server.start_consuming, daemon=True)
    serving.start()

    client_connection = connect(url)
    client = client_connection.channel()
    callback_queue = client.queue_declare(queue="", exclusive=True).method.queue
    answers = {}

    def on_response(channel, method, properties, body):
        answers[properties.correlation_id] = body.decode()

    client.basic_consume(queue=callback_queue, on_message_callback=on_response, auto_ack=True)
    for n, expected in [(10, "55"), (30, "832040"), (1, "1")]:
        corr_id = str(uuid.uuid4())
        client.basic_publish(
            exchange="",
            routing_key="rpc_queue",
            properties=pika.BasicProperties(reply_to=callback_queue, correlation_id=corr_id),
            body=str(n),
        )
        wait_until(f"the answer to fib({n})", lambda: corr_id in answers, client_connection)
        expect_equal(f"fib({n})", answers.pop(corr_id), expected)
    expect_equal("answers nobody asked for", answers, {})

    server_connection.add_callback_threadsafe(server.stop_consuming)
    serving.join(TIMEOUT)
    if serving.is_alive():
        raise AssertionError("the RPC server did not stop")
    server_connection.close()
    client_connection.close()


if __name__ == "__main__":
    main(
        {
            "hello_world": hello_world,
            "work_queues": work_queues,
            "publish_subscribe": publish_subscribe,
            "routing": routing,
            "topics": topics,
            "rpc": rpc,
        }
    )
