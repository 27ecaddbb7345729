"""The task bus: the in-memory waiter map (one worker process) or Redis (any
number of workers and hosts), behind one interface (`base.TaskBus`)."""
from services.bus.base import TaskBus
from services.bus.states import FINAL, TRANSITIONS, TaskState

__all__ = ["FINAL", "TRANSITIONS", "TaskBus", "TaskState", "create_bus"]


def create_bus(config) -> TaskBus:
    """The bus the config selects: Redis when REDIS_URL is set, else memory.
    Neither connects anywhere yet: the server starts even while Redis is down."""
    if config.get("REDIS_URL"):
        from services.bus.redis import RedisTaskBus

        return RedisTaskBus.from_config(config)
    from services.bus.base import Delivery
    from services.bus.memory import MemoryTaskBus

    return MemoryTaskBus(session_liveness=float(config["SESSION_LIVENESS"]),
                         delivery=Delivery.from_config(config))
