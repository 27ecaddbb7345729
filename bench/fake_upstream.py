"""A fast fake OpenAI-compatible upstream: raw asyncio, keep-alive, fixed
small answers. Run as its own process:

    python -m bench.fake_upstream --port 9100 [--delay 0.6]

`POST /v1/chat/completions` answers one chat.completion, or with
`"stream": true` a chunked SSE body of CHUNKS chat.completion.chunk events
and `data: [DONE]`; `POST /v1/embeddings` answers one vector of DIMENSIONS
per input (a small embedding model's size); `GET /v1/models` lists one model. It prints `ready` on
stdout once listening.
"""
import argparse
import asyncio
import json
import signal

import orjson

MODEL = "bench-model"
CHUNKS = 8
DIMENSIONS = 384


def _http(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type +
            b"\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\nConnection: keep-alive\r\n\r\n" + body)


def _completion() -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "The quick brown fox."}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
    }).encode()


def _stream() -> bytes:
    events = []
    for i in range(CHUNKS):
        chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                 "created": 1700000000, "model": MODEL,
                 "choices": [{"index": 0, "delta": {"content": f" word{i}"},
                              "finish_reason": "stop" if i == CHUNKS - 1 else None}]}
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    frames = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: keep-alive\r\n\r\n" + frames)


def _embeddings(count: int) -> bytes:
    vector = [round((i % 97) / 97 - 0.5, 6) for i in range(DIMENSIONS)]
    return _http(b"200 OK", b"application/json", json.dumps({
        "object": "list", "model": MODEL,
        "data": [{"object": "embedding", "index": n, "embedding": vector} for n in range(count)],
        "usage": {"prompt_tokens": 4 * count, "total_tokens": 4 * count}}).encode())


EMBEDDING_RESPONSES: dict[int, bytes] = {}  # by the number of inputs

COMPLETION_RESPONSE = _http(b"200 OK", b"application/json", _completion())
STREAM_RESPONSE = _stream()
MODELS_RESPONSE = _http(b"200 OK", b"application/json", json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1700000000,
                                 "owned_by": "bench"}]}).encode())
NOT_FOUND_RESPONSE = _http(b"404 Not Found", b"application/json",
                           b'{"error": {"message": "not found"}}')
BAD_REQUEST_RESPONSE = _http(b"400 Bad Request", b"application/json",
                             b'{"error": {"message": "bad request"}}')


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 with Content-Length bodies, pipelining-safe, keep-alive."""

    delay = 0.0  # seconds before each answer (`--delay`: a model's pace)

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4:total])
            del self.buffer[:total]
            if self.delay:
                asyncio.get_running_loop().call_later(
                    self.delay, self._write, self.answer(head, body))
            else:
                self.transport.write(self.answer(head, body))

    def _write(self, data: bytes):
        if not self.transport.is_closing():
            self.transport.write(data)

    @staticmethod
    def answer(head: bytes, body: bytes) -> bytes:
        method, path = head.split(b" ", 2)[:2]
        if method == b"POST" and path.rstrip(b"/") == b"/v1/chat/completions":
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                return BAD_REQUEST_RESPONSE
            return STREAM_RESPONSE if request.get("stream") is True else COMPLETION_RESPONSE
        if method == b"POST" and path.rstrip(b"/") == b"/v1/embeddings":
            try:
                inputs = orjson.loads(body)["input"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return BAD_REQUEST_RESPONSE
            count = 1 if isinstance(inputs, str) else min(len(inputs), 2048)
            if count not in EMBEDDING_RESPONSES:
                EMBEDDING_RESPONSES[count] = _embeddings(count)
            return EMBEDDING_RESPONSES[count]
        if method == b"GET" and path.rstrip(b"/") == b"/v1/models":
            return MODELS_RESPONSE
        return NOT_FOUND_RESPONSE


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds before each answer (default 0: at once)")
    args = parser.parse_args(argv)
    UpstreamProtocol.delay = args.delay
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
