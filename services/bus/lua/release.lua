-- release(task_id, lease, llm) -> 1 when this was the task's last waiting request.
-- Idempotent: a lease released twice, or never taken, changes nothing.
return release(ARG(1), ARG(2), ARG(3)) and 1 or 0
