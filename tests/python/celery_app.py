"""A Celery app whose broker is Hopper (CELERY_BROKER_URL, amqp://guest:guest@HOST:PORT//) and
whose results come back over AMQP too (the rpc:// backend), imported both by the worker and by
the scenario that sends it tasks (celery_retry.py).

What Celery needs changed from its defaults to work with Hopper, each for a missing broker
feature:

- `task_protocol = 1`: protocol 2 carries the task's metadata in the AMQP headers table,
  with None, integers, booleans and lists as values; Hopper keeps header values as text
  (None arrives as 'Void'), and the worker refuses the message ("invalid ETA value 'Void'").
  Protocol 1 carries it all in the body.
- `control_queue_expires`, `event_queue_expires` and `result_expires` None: Celery declares
  its remote-control, event and rpc:// reply queues with `x-expires`, which Hopper refuses
  with 406.
"""

import os

from celery import Celery

app = Celery("hopper_celery", broker=os.environ["CELERY_BROKER_URL"], backend="rpc://")
app.conf.update(
    task_protocol=1,
    control_queue_expires=None,
    event_queue_expires=None,
    result_expires=None,
    broker_connection_retry_on_startup=False,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


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
