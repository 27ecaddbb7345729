"""A look at a socket that never waits, not even for gevent's hub."""
import select

from gevent import monkey

# The real poll(2): gevent's would hand a zero-timeout check to the hub, a
# switch for something the kernel answers at once.
_poll = monkey.get_original("select", "poll")


def has_input(fd: int) -> bool:
    """Whether the socket has bytes to read, or its end (or an error) to report."""
    poller = _poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
