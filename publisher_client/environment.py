"""What `requests` reads from the environment for a URL (HTTPS_PROXY,
HTTP_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, ~/.netrc), read once.

A Session with `trust_env` reads all of it again on every request: the
whole environment and a look for ~/.netrc each time, which costs more CPU
than relaying a whole streamed answer once there are a hundred of them a
second. Our sessions each talk to one base URL, so what the environment
says for it is read when the session is made and set on the session.
"""
import requests


def read_environment_once(session: requests.Session, url: str) -> requests.Session:
    """Set on `session` what the environment says for `url`'s host, and stop
    it from reading the environment again."""
    settings = session.merge_environment_settings(url, {}, None, None, None)
    session.proxies.update(settings["proxies"])  # none when NO_PROXY covers the host
    session.verify = settings["verify"]
    session.cert = settings["cert"]
    session.auth = session.auth or requests.utils.get_netrc_auth(url)
    session.trust_env = False
    return session
