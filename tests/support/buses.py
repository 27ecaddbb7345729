"""Task buses for the bus's own tests: `Buses` makes memory buses, or Redis
buses that share one key prefix (each one a "worker"), and checks at the end
that nothing is left behind: no local entry, and no Redis key without a TTL."""
from services.bus.memory import MemoryTaskBus
from services.bus.redis import RedisTaskBus
from tests.support import stack


class Buses:
    def __init__(self, kind: str, **defaults):
        self.kind = kind
        self.defaults = defaults
        self.prefix = f"{stack.unique_name('bus')}:"
        self.made: list = []

    def make(self, url: str = stack.REDIS_URL, **kwargs):
        """A new bus (a new worker, on Redis) with these constructor arguments."""
        options = {**self.defaults, **kwargs}
        if self.kind == "memory":
            bus = MemoryTaskBus(**options)
        else:
            bus = RedisTaskBus.from_url(url, prefix=self.prefix, **options)
        self.made.append(bus)
        return bus

    def close(self) -> list[str]:
        """Close every bus; returns the Redis keys that had no TTL (there must be none)."""
        for bus in self.made:
            bus.close()
        if self.kind == "memory":
            return []
        left = stack.keys_without_ttl(self.prefix)
        stack.delete_redis_keys(self.prefix)
        return left

    def keys(self) -> dict:
        return stack.redis_keys(self.prefix) if self.kind == "redis" else {}
