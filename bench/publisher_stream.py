"""How long a streamed 200-word answer takes through a real publisher, and
how many chunk POSTs it costs.

    .venv/bin/python -m bench.publisher_stream [--words 200] [--runs 20]
                                               [--token-delay-ms 0]

Starts Switchboard (gunicorn + gevent, temp SQLite) and the real
`python -m publisher_client run` process. With the default delay of 0 the
backend is the built-in `echo` (every word at once); with
`--token-delay-ms N` it is a FakeOpenAI streaming one word every N ms, like
a GPU would. Each run is timed from sending the request to reading
`data: [DONE]`; the chunk POSTs come from the publisher's own log line
(`... N chunks in M posts`).
"""
import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from tests.publisher_client.helpers import PublisherProcess, wait_for
from tests.support.fake_openai import FakeOpenAI
from tests.support.live import start_server

DONE_LINE = re.compile(r"\(bench, stream\) done in (\d+) ms: (\d+) chunks in (\d+) posts")


def run(words: int, runs: int, token_delay_ms: float):
    text = " ".join(f"word{i}" for i in range(words))
    with tempfile.TemporaryDirectory(prefix="publisher-bench-") as tmp:
        tmp = Path(tmp)
        server = start_server(tmp)
        fake = None
        publisher = None
        try:
            if token_delay_ms:
                fake = FakeOpenAI(chunk_delay=token_delay_ms / 1000).start()
                llm = {"name": "bench", "type": "openai", "url": fake.url, "model": "fake"}
            else:
                llm = {"name": "bench", "type": "echo"}
            publisher = PublisherProcess(server, tmp, [llm]).start()
            http = requests.Session()
            http.trust_env = False
            totals, firsts = [], []
            for i in range(runs):
                started = time.perf_counter()
                first = None
                response = http.post(f"{server.url}/api/v1/llms/bench/infer",
                                     headers=server.headers("client"), stream=True,
                                     timeout=(5, 120),
                                     json={"stream": True,
                                           "messages": [{"role": "user", "content": text}]})
                response.raise_for_status()
                for line in response.iter_lines():
                    if first is None and line.startswith(b"data: {"):
                        first = time.perf_counter() - started
                    if line == b"data: [DONE]":
                        break
                totals.append(time.perf_counter() - started)
                firsts.append(first)
                response.close()
            wait_for(lambda: len(DONE_LINE.findall(publisher.log_text())) >= runs,
                     what="the publisher's log lines")
            posts = [int(m[2]) for m in DONE_LINE.findall(publisher.log_text())]
            chunks = [int(m[1]) for m in DONE_LINE.findall(publisher.log_text())]
        finally:
            if publisher is not None:
                publisher.terminate()
                publisher.stop()
            if fake is not None:
                fake.stop()
            server.stop()
    backend = f"FakeOpenAI, {token_delay_ms:g} ms per word" if token_delay_ms else "echo"
    print(f"streamed {words}-word answer, {runs} runs, backend: {backend}")
    print(f"  end to end (request → [DONE]): median {ms(statistics.median(totals))}, "
          f"min {ms(min(totals))}, max {ms(max(totals))}")
    print(f"  first chunk:                   median {ms(statistics.median(firsts))}")
    print(f"  chunks per answer: {chunks[0]}; chunk POSTs per answer: "
          f"median {statistics.median(posts):g}, min {min(posts)}, max {max(posts)}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    run(args.words, args.runs, args.token_delay_ms)


if __name__ == "__main__":
    sys.exit(main())
