"""What the Python scenarios share: connecting, waiting for deliveries with a deadline, and a
small command-line entry point that runs one scenario against the broker's AMQP URL.

Every wait here is bounded: a scenario that does not get what it expects fails within
TIMEOUT seconds with a message saying what it saw, it never hangs.
"""

import sys
import time
import traceback

import pika

# How long any one wait (a delivery, a reply, a confirm) may take.
TIMEOUT = 10.0


def connect(url):
    """A blocking pika connection to `url` (amqp://guest:guest@HOST:PORT/%2F)."""
    parameters = pika.URLParameters(url)
    parameters.socket_timeout = TIMEOUT
    parameters.stack_timeout = TIMEOUT
    parameters.blocked_connection_timeout = TIMEOUT
    return pika.BlockingConnection(parameters)


def ack_each(channel, deliveries):
    """Acks every one of `deliveries`."""
    for method, _, _ in deliveries:
        channel.basic_ack(method.delivery_tag)


class Consumer:
    """A consumer of `queue` on `channel` (pika's consume generator) whose deliveries are
    taken a few at a time, each wait bounded by TIMEOUT.

    Cancel it only once what it got is settled and nothing more is on its way: Hopper takes
    back a cancelled consumer's unacked deliveries, where RabbitMQ leaves them to the channel,
    so pika's reject of a delivery that crossed its basic.cancel would name a tag Hopper no
    longer knows."""

    def __init__(self, channel, queue, auto_ack=False):
        self.channel = channel
        self.queue = queue
        self.auto_ack = auto_ack
        self.deliveries = channel.consume(queue, auto_ack=auto_ack, inactivity_timeout=TIMEOUT)

    def take(self, count, settle=ack_each):
        """The next `count` deliveries as (method, properties, body), handed to
        `settle(channel, deliveries)` first (which acks each; not called with auto-ack)."""
        got = []
        while len(got) < count:
            method, properties, body = next(self.deliveries)
            if method is None:
                seen = [body for _, _, body in got]
                raise AssertionError(
                    f"{self.queue}: {len(got)} of {count} deliveries within {TIMEOUT} s: {seen}"
                )
            got.append((method, properties, body))
        if not self.auto_ack:
            settle(self.channel, got)
        return got

    def cancel(self):
        """Cancels the consumer."""
        self.channel.cancel()


def receive(channel, queue, count, auto_ack=False, settle=ack_each):
    """Consumes `count` deliveries from `queue`, settles them (see Consumer.take), cancels the
    consumer and returns them. `queue` should hold no more than `count` (see Consumer)."""
    consumer = Consumer(channel, queue, auto_ack)
    got = consumer.take(count, settle)
    consumer.cancel()
    return got


def bodies(deliveries):
    """The bodies of `deliveries` as text."""
    return [body.decode() for _, _, body in deliveries]


def ready(channel, queue):
    """How many messages wait in `queue` (a passive declare)."""
    return channel.queue_declare(queue, passive=True).method.message_count


def expect_equal(what, actual, expected):
    """Fails with `what`, the actual and the expected value unless they are equal."""
    if actual != expected:
        raise AssertionError(f"{what}: got {actual!r}, expected {expected!r}")


def wait_until(what, condition, connection):
    """Serves `connection`'s events until `condition()` is true; fails after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what}: not within {TIMEOUT} s")
        connection.process_data_events(time_limit=min(left, 0.1))


def exists(connection, queue):
    """True if `queue` exists: a passive declare on a channel of its own, since a 404 closes
    the channel it came on."""
    channel = connection.channel()
    try:
        channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as closed:
        expect_equal(f"the reply code of a passive declare of {queue}", closed.reply_code, 404)
        return False
    channel.close()
    return True


def main(scenarios):
    """Runs `argv[1]` of `scenarios` (a dict of name to function taking the URL) against the
    URL in `argv[2]`, and exits 0 when it passes, 1 when it fails (with the traceback) and 2,
    listing the scenarios, when called otherwise."""
    if len(sys.argv) != 3 or sys.argv[1] not in scenarios:
        names = ", ".join(sorted(scenarios))
        print(f"usage: {sys.argv[0]} SCENARIO AMQP_URL (scenarios: {names})", file=sys.stderr)
        sys.exit(2)
    name, url = sys.argv[1], sys.argv[2]
    started = time.monotonic()
    try:
        scenarios[name](url)
    except Exception:  # the whole point is to report any failure and exit non-zero
        traceback.print_exc()
        print(f"{name}: FAILED after {time.monotonic() - started:.2f} s", file=sys.stderr)
        sys.exit(1)
    print(f"{name}: ok in {time.monotonic() - started:.2f} s")

