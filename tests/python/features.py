"""RabbitMQ features beyond the tutorials, driven with pika: publisher confirms, basic.get,
nack with requeue, dead-lettering with x-death (and x-first-death-*, and through the default
exchange), mandatory returns, reject-publish overflow, settling after a cancel, and typed
headers.

    python features.py SCENARIO amqp://guest:guest@HOST:PORT/%2F
"""

import pika
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError

from common import Consumer, bodies, connect, expect_equal, main, ready, receive


def nack_last(channel, deliveries):
    """Nacks every one of `deliveries` with requeue, in one basic.nack with multiple."""
    channel.basic_nack(deliveries[-1][0].delivery_tag, multiple=True, requeue=True)


def reject_each(channel, deliveries):
    """Rejects every one of `deliveries` without requeue: they die."""
    for method, _, _ in deliveries:
        channel.basic_reject(method.delivery_tag, requeue=False)


def publisher_confirms(url):
    """Every publish on a confirm channel returns only once the broker acked it; a publish to
    an exchange that does not exist closes the channel with 404."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue="confirmed")
    for n in range(50):
        channel.basic_publish(exchange="", routing_key="confirmed", body=f"m{n}")
    expect_equal("confirmed messages in the queue", ready(channel, "confirmed"), 50)
    expect_equal("the bodies", bodies(receive(channel, "confirmed", 50)), [f"m{n}" for n in range(50)])

    try:
        channel.basic_publish(exchange="no-such-exchange", routing_key="x", body="lost")
        raise AssertionError("a publish to a missing exchange was confirmed")
    except ChannelClosedByBroker as closed:
        expect_equal("the reply code", closed.reply_code, 404)
    connection.close()


def basic_get(url):
    """basic.get takes one message at a time with the count left behind, and get-empty says
    the queue is empty; a message got and rejected with requeue comes back redelivered."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue="polled")
    for body in ["first", "second", "third"]:
        channel.basic_publish(exchange="", routing_key="polled", body=body)

    method, _, body = channel.basic_get("polled")
    expect_equal("the first get", (body, method.message_count, method.redelivered), (b"first", 2, False))
    channel.basic_ack(method.delivery_tag)

    method, _, body = channel.basic_get("polled")
    expect_equal("the second get", body, b"second")
    channel.basic_reject(method.delivery_tag, requeue=True)
    method, _, body = channel.basic_get("polled")
    expect_equal("the requeued get", (body, method.redelivered), (b"second", True))
    channel.basic_ack(method.delivery_tag)

    method, _, body = channel.basic_get("polled", auto_ack=True)
    expect_equal("the third get", (body, method.message_count), (b"third", 0))
    expect_equal("a get on the empty queue", channel.basic_get("polled"), (None, None, None))
    connection.close()


def nack_requeue(url):
    """basic.nack with requeue=True puts a message back: it comes again flagged redelivered;
    multiple=True nacks every delivery up to the tag."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue="flaky")
    channel.basic_publish(exchange="", routing_key="flaky", body="again")

    # One consumer throughout: the requeued messages come back to it.
    flaky = Consumer(channel, "flaky")
    [(method, _, body)] = flaky.take(1, settle=nack_last)
    expect_equal("the first delivery", (body, method.redelivered), (b"again", False))
    [(method, _, body)] = flaky.take(1)
    expect_equal("the delivery after the nack", (body, method.redelivered), (b"again", True))

    for n in range(3):
        channel.basic_publish(exchange="", routing_key="flaky", body=f"batch {n}")
    got = flaky.take(3, settle=nack_last)
    expect_equal("the batch", bodies(got), ["batch 0", "batch 1", "batch 2"])
    expect_equal("redelivered flags", [method.redelivered for method, _, _ in got], [False] * 3)
    got = flaky.take(3)
    expect_equal("the batch again", bodies(got), ["batch 0", "batch 1", "batch 2"])
    expect_equal("redelivered flags", [method.redelivered for method, _, _ in got], [True] * 3)
    flaky.cancel()
    expect_equal("the queue afterwards", ready(channel, "flaky"), 0)
    connection.close()


def dead_letter(url):
    """A queue with x-dead-letter-exchange and x-dead-letter-routing-key: a message rejected
    without requeue goes through that exchange, with the dead-letter routing key, to the DLQ,
    its properties kept and RabbitMQ's x-death header added."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange="dlx", exchange_type="direct")
    channel.queue_declare(queue="work.dead")
    channel.queue_bind(queue="work.dead", exchange="dlx", routing_key="dead")
    channel.queue_declare(
        queue="work",
        arguments={"x-dead-letter-exchange": "dlx", "x-dead-letter-routing-key": "dead"},
    )
    properties = pika.BasicProperties(
        content_type="text/plain", correlation_id="c-42", headers={"tenant": "acme"}
    )
    channel.basic_publish(exchange="", routing_key="work", body="poison", properties=properties)

    [(method, _, body)] = receive(channel, "work", 1, settle=reject_each)
    expect_equal("the delivery", body, b"poison")

    [(method, properties, body)] = receive(channel, "work.dead", 1)
    expect_equal("the dead-lettered body", body, b"poison")
    expect_equal("its routing key", method.routing_key, "dead")
    expect_equal("its content type", properties.content_type, "text/plain")
    expect_equal("its correlation id", properties.correlation_id, "c-42")
    headers = properties.headers or {}
    expect_equal("its own header", headers.get("tenant"), "acme")
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or len(deaths) != 1:
        raise AssertionError(f"x-death should be a list of one table: {headers!r}")
    death = deaths[0]
    expect_equal("x-death queue", death.get("queue"), "work")
    expect_equal("x-death reason", death.get("reason"), "rejected")
    expect_equal("x-death count", death.get("count"), 1)
    expect_equal("x-death exchange", death.get("exchange"), "")
    expect_equal("x-death routing-keys", death.get("routing-keys"), ["work"])
    if "time" not in death:
        raise AssertionError(f"x-death has no time: {death!r}")
    expect_equal("the queue afterwards", ready(channel, "work"), 0)
    connection.close()


def expired_dead_letter(url):
    """A message that outlives the queue's x-message-ttl is dead-lettered with reason
    'expired' (the wait is for the DLQ's delivery, bounded by the consumer's timeout)."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange="expired", exchange_type="fanout")
    channel.queue_declare(queue="short.dead")
    channel.queue_bind(queue="short.dead", exchange="expired")
    channel.queue_declare(queue="short", arguments={"x-message-ttl": 50, "x-dead-letter-exchange": "expired"})
    channel.basic_publish(exchange="", routing_key="short", body="stale")
    [(_, properties, body)] = receive(channel, "short.dead", 1)
    expect_equal("the expired body", body, b"stale")
    [death] = properties.headers["x-death"]
    expect_equal("x-death", (death["queue"], death["reason"], death["count"]), ("short", "expired", 1))
    connection.close()


def mandatory_return(url):
    """A mandatory publish that no queue takes comes back as basic.return (pika raises
    UnroutableError on a confirm channel); a routable one is confirmed as usual."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange="nowhere", exchange_type="direct")
    try:
        channel.basic_publish(exchange="nowhere", routing_key="nobody", body="lost?", mandatory=True)
        raise AssertionError("an unroutable mandatory publish was not returned")
    except UnroutableError as unroutable:
        [returned] = unroutable.messages
        method = returned.method
        expect_equal(
            "the return",
            (returned.body, method.reply_code, method.reply_text, method.exchange, method.routing_key),
            (b"lost?", 312, "NO_ROUTE", "nowhere", "nobody"),
        )

    # Without mandatory, the same message is dropped quietly and confirmed.
    channel.basic_publish(exchange="nowhere", routing_key="nobody", body="dropped")
    channel.queue_declare(queue="somebody")
    channel.queue_bind(queue="somebody", exchange="nowhere", routing_key="somebody")
    channel.basic_publish(exchange="nowhere", routing_key="somebody", body="kept", mandatory=True)
    expect_equal("the routed message", bodies(receive(channel, "somebody", 1)), ["kept"])
    connection.close()


def reject_publish_overflow(url):
    """A queue with x-max-length 2 and x-overflow reject-publish nacks the third publish (pika
    raises NackError on a confirm channel) and takes publishes again once there is room."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(
        queue="bounded", arguments={"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    channel.basic_publish(exchange="", routing_key="bounded", body="one")
    channel.basic_publish(exchange="", routing_key="bounded", body="two")
    try:
        channel.basic_publish(exchange="", routing_key="bounded", body="three")
        raise AssertionError("the third publish into a full queue was confirmed")
    except NackError:
        pass
    expect_equal("messages in the full queue", ready(channel, "bounded"), 2)

    method, _, body = channel.basic_get("bounded", auto_ack=True)
    expect_equal("the first", body, b"one")
    channel.basic_publish(exchange="", routing_key="bounded", body="four")
    expect_equal("the rest", bodies(receive(channel, "bounded", 2)), ["two", "four"])
    connection.close()


def ack_after_cancel(url):
    """As in RabbitMQ, basic.cancel leaves the consumer's unacked deliveries with the channel:
    they can still be acked after it."""
    connection = connect(url)
    channel = connection.channel()
    channel.queue_declare(queue="later")
    channel.basic_publish(exchange="", routing_key="later", body="x")
    [(method, _, _)] = receive(channel, "later", 1, settle=lambda channel, deliveries: None)
    channel.basic_ack(method.delivery_tag)
    expect_equal("ready after the ack", ready(channel, "later"), 0)
    connection.close()


def requeue_while_consuming_then_cancel(url):
    """pika's generator consumer: a reject with requeue while the consumer is on sends the
    message straight back to it; pika's cancel() rejects what arrived after its basic.cancel,
    which the channel still holds, so it goes back to the queue."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue="bounce")
    channel.basic_publish(exchange="", routing_key="bounce", body="x")
    consumer = Consumer(channel, "bounce")

    def requeue(channel, deliveries):
        for method, _, _ in deliveries:
            channel.basic_reject(method.delivery_tag, requeue=True)

    consumer.take(1, settle=requeue)
    consumer.cancel()
    expect_equal("ready afterwards", ready(channel, "bounce"), 1)
    connection.close()


def dead_letter_through_the_default_exchange(url):
    """x-dead-letter-exchange '' is the default exchange: with x-dead-letter-routing-key the
    dead message goes to the queue of that name."""
    connection = connect(url)
    channel = connection.channel()
    channel.queue_declare(queue="plain.dead")
    channel.queue_declare(
        queue="plain", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "plain.dead"}
    )
    channel.basic_publish(exchange="", routing_key="plain", body="x")
    receive(channel, "plain", 1, settle=lambda ch, ds: [ch.basic_reject(m.delivery_tag, requeue=False) for m, _, _ in ds])
    [(_, properties, body)] = receive(channel, "plain.dead", 1)
    expect_equal("the body", body, b"x")
    connection.close()


def header_types(url):
    """The headers table comes back as sent: integers, booleans, void, arrays and tables keep
    their types."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue="typed")
    headers = {"int": 7, "bool": True, "none": None, "list": [1, "a"], "table": {"k": "v"}, "text": "t"}
    channel.basic_publish(exchange="", routing_key="typed", body="x", properties=pika.BasicProperties(headers=headers))
    method, properties, _ = channel.basic_get("typed", auto_ack=True)
    expect_equal("the headers", properties.headers, headers)
    connection.close()


def first_death_headers(url):
    """Beside x-death, x-first-death-queue, -reason and -exchange (and x-last-death-*)."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange="fd.dlx", exchange_type="fanout")
    channel.queue_declare(queue="fd.dead")
    channel.queue_bind(queue="fd.dead", exchange="fd.dlx")
    channel.queue_declare(queue="fd", arguments={"x-dead-letter-exchange": "fd.dlx"})
    channel.basic_publish(exchange="", routing_key="fd", body="x")
    method, _, _ = channel.basic_get("fd")
    channel.basic_reject(method.delivery_tag, requeue=False)
    [(_, properties, _)] = receive(channel, "fd.dead", 1)
    headers = properties.headers
    expect_equal(
        "x-first-death-*",
        (headers.get("x-first-death-queue"), headers.get("x-first-death-reason"), headers.get("x-first-death-exchange")),
        ("fd", "rejected", ""),
    )
    connection.close()


if __name__ == "__main__":
    main(
        {
            "publisher_confirms": publisher_confirms,
            "basic_get": basic_get,
            "nack_requeue": nack_requeue,
            "dead_letter": dead_letter,
            "expired_dead_letter": expired_dead_letter,
            "mandatory_return": mandatory_return,
            "reject_publish_overflow": reject_publish_overflow,
            "ack_after_cancel": ack_after_cancel,
            "requeue_while_consuming_then_cancel": requeue_while_consuming_then_cancel,
            "dead_letter_through_the_default_exchange": dead_letter_through_the_default_exchange,
            "header_types": header_types,
            "first_death_headers": first_death_headers,
        }
    )
