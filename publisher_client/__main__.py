"""`python -m publisher_client run --config publisher.yaml`"""
import argparse
import logging
import signal
import sys

from publisher_client import __version__
from publisher_client.config import load_config
from publisher_client.errors import ConfigError, PublisherError
from publisher_client.publisher import Publisher

log = logging.getLogger("publisher_client")

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m publisher_client",
        description="Publish local LLMs to a Switchboard server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="register, then serve tasks until SIGTERM or Ctrl-C")
    run.add_argument("--config", required=True, help="the publisher's YAML (or JSON) config")
    run.add_argument("--log-level", default="INFO",
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    check = commands.add_parser("check-config", help="validate the config and exit")
    check.add_argument("--config", required=True)
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.command == "check-config":
        print(f"{args.config}: OK ({len(config.llms)} LLM(s), {len(config.agents)} agent(s))")
        return EXIT_OK

    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # urllib3 logs every new connection at DEBUG; keep --log-level DEBUG readable.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, logging.getLogger().level))
    publisher = Publisher(config)

    def interrupt(signum, _frame):
        # SIGTERM behaves like Ctrl-C: it interrupts the held poll at once, and
        # run()'s cleanup disconnects the session. Once is enough: a second
        # signal must not cut the session's DELETE short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not publisher.stopping.is_set():   # set when the shutdown has begun
            raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    log.info("publishing %s to %s", ", ".join(llm.name for llm in config.llms), config.server)
    try:
        publisher.run()
    except KeyboardInterrupt:
        log.info("stopped")
    except PublisherError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
