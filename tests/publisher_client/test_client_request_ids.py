"""The publisher logs the request id of each task it runs, so that one id
follows a call from the client through the server to the backend."""
import responses

from publisher_client import Publisher
from tests.publisher_client.helpers import API, wait_for


def test_the_request_id_of_each_task_is_in_the_publishers_log(make_config, mocked, caplog):
    caplog.set_level("INFO", logger="publisher_client")
    mocked.add(responses.POST, f"{API}/tasks/t1/result", json={"accepted": True})
    publisher = Publisher(make_config(llms=[{"name": "my-echo", "type": "echo"}]))
    publisher.session_id = "sess-1"
    try:
        publisher.dispatch({"kind": "infer", "task_id": "t1", "llm": "my-echo",
                            "streaming": False, "request_id": "client.Req-42",
                            "body": {"messages": [{"role": "user", "content": "hi"}]}})
        wait_for(lambda: mocked.calls, what="the result")
    finally:
        publisher.stopping.set()
    assert "task t1 (my-echo, infer): request client.Req-42" in caplog.text
