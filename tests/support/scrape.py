"""Reading a live server's /metrics (admin token) in tests."""
import requests
from prometheus_client.parser import text_string_to_metric_families


def scrape(server) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample of /metrics."""
    response = requests.get(f"{server.url}/metrics", headers=server.headers("admin"), timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def gauge(server, name, **labels):
    """One sample's value now."""
    return value(scrape(server), name, **labels)
