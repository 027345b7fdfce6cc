"""A Celery app whose broker is Hopper (CELERY_BROKER_URL, amqp://guest:guest@HOST:PORT//) and
whose results come back over AMQP too (the rpc:// backend), imported both by the worker and by
the scenario that sends it tasks (celery_retry.py).

Celery runs with its defaults: task protocol 2 (its metadata in the AMQP headers table, with
typed values), `x-expires` on its remote-control, event and rpc:// reply queues, and
`basic.qos` raised on a running consumer while it holds countdown tasks. Only startup retries
are off, so a broker that is not there fails the test at once.
"""

import os

from celery import Celery

app = Celery("hopper_celery", broker=os.environ["CELERY_BROKER_URL"], backend="rpc://")
app.conf.update(broker_connection_retry_on_startup=False)


@app.task(bind=True, max_retries=5)
def flaky(self, name, failures):
    """Fails its first `failures` runs, retrying each time after a short countdown, then
    succeeds and says how many retries it took."""
    if self.request.retries < failures:
        raise self.retry(countdown=0.2)
    return f"{name} done after {self.request.retries} retries"


@app.task
def add(x, y):
    """Adds, the first time."""
    return x + y
