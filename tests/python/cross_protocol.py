"""The pika halves of the cross-protocol tests: tests/tests/amqp_python.rs runs one step, then
the `hopper` CLI (consume, publish, queue move), then the next step.

    python cross_protocol.py STEP amqp://guest:guest@HOST:PORT/%2F
"""

import json

import pika

from common import Consumer, bodies, connect, expect_equal, main, ready, receive, wait_until


def publish_orders(url):
    """Publishes three orders to the durable queue `orders`, with properties and a header,
    each confirmed; `hopper consume orders` reads them next."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue="orders", durable=True)
    for n in range(3):
        properties = pika.BasicProperties(
            content_type="application/json",
            correlation_id=f"order-{n}",
            delivery_mode=pika.DeliveryMode.Persistent,
            headers={"tenant": "acme"},
        )
        body = json.dumps({"n": n})
        channel.basic_publish(exchange="", routing_key="orders", body=body, properties=properties)
    expect_equal("orders waiting", ready(channel, "orders"), 3)
    connection.close()


def consume_from_cli(url):
    """Consumes what `hopper publish orders --content-type text/plain --header
    amqp-correlation-id=cli-1 --header tenant=acme 'from the cli'` published: the header named
    after a property comes back as that property."""
    connection = connect(url)
    channel = connection.channel()
    [(_, properties, body)] = receive(channel, "orders", 1)
    expect_equal("the body", body, b"from the cli")
    expect_equal("the content type", properties.content_type, "text/plain")
    expect_equal("the correlation id", properties.correlation_id, "cli-1")
    expect_equal("the headers", properties.headers, {"tenant": "acme"})
    connection.close()


def dead_letter_jobs(url):
    """Declares `jobs`, whose dead messages go through the exchange `jobs.dlx` to `jobs.dead`,
    publishes two jobs and rejects both without requeue; returns once both wait in
    `jobs.dead`, for `hopper queue move jobs.dead` to send back."""
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange="jobs.dlx", exchange_type="fanout")
    channel.queue_declare(queue="jobs.dead")
    channel.queue_bind(queue="jobs.dead", exchange="jobs.dlx")
    channel.queue_declare(queue="jobs", arguments={"x-dead-letter-exchange": "jobs.dlx"})
    for body in ["job 1", "job 2"]:
        channel.basic_publish(exchange="", routing_key="jobs", body=body)

    def reject(channel, deliveries):
        for method, _, _ in deliveries:
            channel.basic_reject(method.delivery_tag, requeue=False)

    expect_equal("the jobs", bodies(receive(channel, "jobs", 2, settle=reject)), ["job 1", "job 2"])
    wait_until("both jobs in jobs.dead", lambda: ready(channel, "jobs.dead") == 2, connection)
    expect_equal("jobs left in jobs", ready(channel, "jobs"), 0)
    connection.close()


def consume_replayed_jobs(url):
    """Consumes the two jobs moved back into `jobs`: same bodies, still carrying the x-death
    of their rejection; jobs.dead is empty."""
    connection = connect(url)
    channel = connection.channel()
    jobs = Consumer(channel, "jobs")
    got = jobs.take(2)
    jobs.cancel()
    expect_equal("the replayed jobs", bodies(got), ["job 1", "job 2"])
    for _, properties, body in got:
        deaths = (properties.headers or {}).get("x-death") or []
        rows = [(death.get("queue"), death.get("reason"), death.get("count")) for death in deaths]
        expect_equal(f"the x-death of {body!r}", rows, [("jobs", "rejected", 1)])
    expect_equal("jobs.dead afterwards", ready(channel, "jobs.dead"), 0)
    connection.close()


if __name__ == "__main__":
    main(
        {
            "publish_orders": publish_orders,
            "consume_from_cli": consume_from_cli,
            "dead_letter_jobs": dead_letter_jobs,
            "consume_replayed_jobs": consume_replayed_jobs,
        }
    )
