"""A task's states and the allowed moves between them: the one table both buses use."""
import enum


class TaskState(enum.StrEnum):
    QUEUED = "queued"        # waiting in the session's queue
    PICKED = "picked"        # handed to the publisher by a poll
    DONE = "done"            # outcome posted, or stream ended
    FAILED = "failed"        # the bus failed it (publisher disconnected)
    CANCELLED = "cancelled"  # the client went away
    EXPIRED = "expired"      # not picked up, or not finished, in time


# The allowed moves; anything else is a no-op (e.g. a late outcome). PICKED →
# QUEUED is a redelivery: the publisher did not acknowledge the task in time.
TRANSITIONS = {
    TaskState.QUEUED: {TaskState.PICKED, TaskState.FAILED, TaskState.CANCELLED,
                       TaskState.EXPIRED, TaskState.DONE},
    TaskState.PICKED: {TaskState.QUEUED, TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED,
                       TaskState.EXPIRED},
}
OPEN = frozenset(TRANSITIONS)
FINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED, TaskState.EXPIRED})
