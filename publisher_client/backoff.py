"""Exponential backoff with jitter, for when the server is unreachable."""
import random as _random
import time


class Backoff:
    """Delays of base·2ⁿ capped at `cap`, each drawn from [d/2, d] so that a
    fleet of publishers cut off at once does not come back in lockstep.

    `sleep` and `random` are injectable so tests need not wait.
    """

    def __init__(self, base=0.5, cap=30.0, sleep=time.sleep, random=_random.random):
        self.base = base
        self.cap = cap
        self.sleep = sleep
        self.random = random
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return delay / 2 + self.random() * delay / 2

    def wait(self) -> float:
        """Sleep the next delay and return it."""
        delay = self.next_delay()
        self.sleep(delay)
        return delay

    def reset(self):
        self.attempt = 0

    @property
    def failing(self) -> bool:
        return self.attempt > 0
