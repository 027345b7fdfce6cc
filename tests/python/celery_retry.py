"""Celery against Hopper: a worker (solo pool, one process) runs a task that fails twice,
retrying with a countdown, then succeeds, and a plain one; the results come back through the
rpc:// backend. With a prefetch of one, a task waiting for its countdown does not hold up the
next one (Celery raises the consumer's prefetch while it holds it).

    python celery_retry.py retry_until_success amqp://guest:guest@HOST:PORT/%2F
    python celery_retry.py countdown_does_not_hold_up_the_next amqp://guest:guest@HOST:PORT/%2F
"""

import os
import subprocess
import sys
import tempfile

from common import TIMEOUT, expect_equal, main

HERE = os.path.dirname(os.path.abspath(__file__))


def celery_url(url):
    """Celery's spelling of the vhost '/' in `url`: amqp://guest:guest@HOST:PORT//."""
    base, _, vhost = url.rpartition("/")
    expect_equal("the URL's vhost", vhost, "%2F")
    return base + "//"


def retry_until_success(url):
    os.environ["CELERY_BROKER_URL"] = celery_url(url)
    from celery_app import add, flaky  # reads CELERY_BROKER_URL

    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=solo", "--concurrency=1",
             # Mingle waits a second for other workers' answers; there are none.
             "--without-mingle", "--loglevel=INFO", "--hostname=worker@hopper"],
            cwd=HERE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            flaky_result = flaky.delay("job", 2)
            sum_result = add.delay(2, 3)
            expect_equal("add(2, 3)", sum_result.get(timeout=TIMEOUT), 5)
            expect_equal("flaky('job', 2)", flaky_result.get(timeout=TIMEOUT), "job done after 2 retries")
            expect_equal("flaky's state", flaky_result.state, "SUCCESS")
        finally:
            # A warm shutdown: the worker cancels its consumers and closes its connection.
            worker.terminate()
            try:
                status = worker.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                worker.kill()
                status = worker.wait()
            log.seek(0)
            text = log.read().decode(errors="replace")
            print("---- the worker's log ----")
            print(text)
        expect_equal("the worker's exit status", status, 0)
        retries = text.count("retry: Retry in")
        expect_equal("retries in the worker's log", retries, 2)
        errors = [line for line in text.splitlines() if "ERROR/" in line or "CRITICAL/" in line]
        expect_equal("errors in the worker's log", errors, [])


def countdown_does_not_hold_up_the_next(url):
    os.environ["CELERY_BROKER_URL"] = celery_url(url)
    from celery_app import add  # reads CELERY_BROKER_URL

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool=solo", "--concurrency=1",
         "--without-mingle", "--prefetch-multiplier=1", "--hostname=prefetch@hopper"],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        expect_equal("a first task, once the worker is up", add.delay(1, 1).get(timeout=3 * TIMEOUT), 2)
        # Far beyond the wait below: if the next task queued behind it, the wait would fail.
        add.apply_async((0, 0), countdown=10 * TIMEOUT)
        expect_equal("add(2, 3) beside a task held for its countdown", add.delay(2, 3).get(timeout=TIMEOUT), 5)
    finally:
        worker.terminate()
        try:
            worker.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


if __name__ == "__main__":
    main(
        {
            "retry_until_success": retry_until_success,
            "countdown_does_not_hold_up_the_next": countdown_does_not_hold_up_the_next,
        }
    )
