"""A lean publisher for the relay bench: it long-polls Switchboard and answers
each `infer` task from the fake upstream, non-streamed as one result, streamed
as chunk batches (a batch is whatever arrived while the previous POST was in
flight). asyncio + aiohttp, in its own process:

    python -m bench.relay_publisher --server URL --token T --upstream URL --llm NAME \
        [--endpoints chat/completions,embeddings]

It prints `ready <session_id>` once registered, and exits on SIGTERM.
"""
import argparse
import asyncio
import signal

import aiohttp
import orjson

POLLERS = 2  # one poll is always held while the other hands its tasks over
POLL_WAIT = 20


class RelayPublisher:
    def __init__(self, http, server, token, upstream, llm, endpoints=("chat/completions",)):
        self.http = http
        self.api = f"{server}/api/v1"
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.upstream = upstream
        self.llm = llm
        self.endpoints = list(endpoints)
        self.session_id = None
        self.running = set()

    async def register(self, initial_status="active"):
        body = {"llms": [{"name": self.llm, "type": "openai", "model": "bench-model",
                          "initial_status": initial_status, "endpoints": self.endpoints}]}
        async with self.http.post(f"{self.api}/publishers/register", data=orjson.dumps(body),
                                  headers=self.headers) as response:
            response.raise_for_status()
            self.session_id = (await response.json())["session_id"]

    async def poll_forever(self):
        url = f"{self.api}/publishers/{self.session_id}/tasks?wait={POLL_WAIT}&ack="
        acks = []  # what the last poll brought, acknowledged by the next (publisher_client's way)
        while True:
            async with self.http.get(url + ",".join(acks), headers=self.headers) as response:
                tasks = orjson.loads(await response.read())["tasks"]
            acks = [task["task_id"] for task in tasks if task.get("kind") != "cancel"]
            for task in tasks:
                job = asyncio.create_task(self.handle(task))
                self.running.add(job)
                job.add_done_callback(self.running.discard)

    async def handle(self, task):
        task_id = task.get("task_id")
        if task["kind"] == "wake":
            await self.post(f"/tasks/{task_id}/result", {"status": 200, "body": {"ok": True}})
        elif task["kind"] == "infer" and task["streaming"]:
            await self.stream(task_id, task["body"])
        elif task["kind"] == "infer":
            endpoint = task.get("endpoint", "chat/completions")
            async with self.http.post(f"{self.upstream}/{endpoint}",
                                      data=orjson.dumps(task["body"])) as response:
                body = orjson.loads(await response.read())
                status = response.status
            await self.post(f"/tasks/{task_id}/result", {"status": status, "body": body})

    async def stream(self, task_id, body):
        queue = asyncio.Queue()
        sender = asyncio.create_task(self.send_chunks(task_id, queue))
        async with self.http.post(f"{self.upstream}/chat/completions",
                                  data=orjson.dumps(body)) as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    queue.put_nowait(line[6:].strip().decode())
        queue.put_nowait(None)
        await sender

    async def send_chunks(self, task_id, queue):
        seq, done = 0, False
        while not done:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            if batch[-1] is None:
                batch.pop()
                done = True
            await self.post(f"/tasks/{task_id}/chunks", {
                "chunks": [{"data": data} for data in batch], "seq": seq, "done": done})
            seq += len(batch)

    async def post(self, path, body):
        async with self.http.post(self.api + path, data=orjson.dumps(body),
                                  headers=self.headers) as response:
            await response.read()


async def main(args):
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=POLL_WAIT + 10, sock_connect=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        publisher = RelayPublisher(http, args.server, args.token, args.upstream, args.llm,
                                   args.endpoints.split(","))
        await publisher.register(args.initial_status)
        print("ready", publisher.session_id, flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        pollers = [asyncio.create_task(publisher.poll_forever()) for _ in range(POLLERS)]
        await stop.wait()
        for poller in pollers:
            poller.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--llm", required=True)
    parser.add_argument("--initial-status", default="active")
    parser.add_argument("--endpoints", default="chat/completions",
                        help="comma-separated endpoints the LLM serves")
    asyncio.run(main(parser.parse_args()))
