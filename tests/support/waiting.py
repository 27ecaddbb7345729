"""Order events in tests by waiting for a condition, with a deadline."""
import time


def wait_until(condition, timeout: float = 5.0, interval: float = 0.01, message: str = ""):
    """Return condition()'s first truthy value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {message or condition}")
        time.sleep(interval)
