"""Operator live view: `edge-inspector view --connect tcp://HOST:5556`, a web page fed from the result stream.

Standard library HTTP + Server-Sent Events, assets shipped in `static/` (see docs/view.md for why no web
framework: it runs on the Jetson beside the service).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from edge_inspector.core.systemd import Notifier
from edge_inspector.tools.view.server import ViewServer, read_token

log = logging.getLogger(__name__)

__all__ = ["ViewServer", "view_command"]


@click.command("view")
@click.option("--connect", "connect", multiple=True, required=True, metavar="ENDPOINT",
              help="A service's result endpoint, e.g. tcp://127.0.0.1:5556 (repeat for several cameras).")
@click.option("--control", "control", multiple=True, metavar="ENDPOINT",
              help="A service's control endpoint, e.g. tcp://127.0.0.1:5557 (repeatable). Without it the page "
                   "is read-only.")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve the page on.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the operator key that threshold/reload requests must carry (needed with "
                   "--control on a non-loopback --listen).")
@click.option("--keep-fails", type=click.IntRange(1, 500), default=24, show_default=True,
              help="Failed parts kept per camera for the strip (with their pictures).")
@click.option("--keep-scores", type=click.IntRange(10, 100000), default=500, show_default=True,
              help="Recent scores per camera for the threshold histogram.")
@click.option("--silent-after", type=click.FloatRange(0.5, 3600), default=12.0, show_default=True,
              help="Seconds without any message (health comes every publish.health_interval_s) before the "
                   "page says disconnected.")
@click.option("--client-buffer", type=click.IntRange(2, 10000), default=64, show_default=True,
              help="Events queued per browser; past it the browser gets a fresh snapshot instead.")
@click.option("--max-browsers", type=click.IntRange(1, 1000), default=16, show_default=True)
@click.option("--max-browsers-per-client", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Event streams one address may hold; past it its oldest stream makes room for the new one.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME[:PORT]",
              help="Another Host name the page may be opened by (a DNS name or a reverse proxy's); the bound "
                   "address, localhost on loopback and this machine's name are always allowed (repeatable).")
@click.option("--max-connections", type=click.IntRange(4, 4096), default=64, show_default=True,
              help="HTTP connections held at once (one thread each); one address may hold a quarter.")
@click.option("--request-timeout", type=click.FloatRange(0.5, 300), default=10.0, show_default=True,
              help="Seconds a client may take to send a request's headers, and again its body.")
@click.option("--archive", "archive", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The service's archive folder (archive.folder): label its parts on the page; labels go to "
                   "labels.jsonl there (writes need the --token-file key when one is set).")
@click.option("--defect-type", "defect_types", multiple=True, metavar="NAME",
              help="A defect type the operator may pick when labelling (repeatable; none: any short name).")
@click.option("--server-key", type=click.Path(dir_okay=False), default=None,
              help="CURVE: the service's public key file (NAME.key), for results and control.")
@click.option("--client-key", type=click.Path(dir_okay=False), default=None,
              help="CURVE: the view's secret key file (NAME.key_secret); the services must list its public key "
                   "in security.result_clients (and security.control_clients for --control).")
def view_command(connect: tuple[str, ...], control: tuple[str, ...], listen: str, token_file: str | None,
                 keep_fails: int, keep_scores: int, silent_after: float, client_buffer: int,
                 max_browsers: int, max_browsers_per_client: int, allow_hosts: tuple[str, ...],
                 max_connections: int, request_timeout: float, server_key: str | None,
                 client_key: str | None, archive: Path | None, defect_types: tuple[str, ...]) -> None:
    """Serve the operator live view: latest verdicts, defects, failed parts, counters, health."""
    from edge_inspector.core.keys import client_keys_option

    server = ViewServer(list(connect), list(control), listen, token=read_token(token_file), keep_fails=keep_fails,
                        keep_scores=keep_scores, client_buffer=client_buffer, max_clients=max_browsers,
                        silent_after_s=silent_after, keys=client_keys_option(server_key, client_key),
                        allow_hosts=allow_hosts, max_connections=max_connections,
                        max_connections_per_client=max(1, max_connections // 4),
                        max_streams_per_client=max_browsers_per_client, header_timeout_s=request_timeout,
                        body_timeout_s=request_timeout, archive=archive, defect_types=defect_types)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    notifier = Notifier()
    server.start()
    mode = f"control via {', '.join(control)}" if control else "read-only"
    log.info("live view on %s (results from %s; %s)", server.url, ", ".join(connect), mode)
    click.echo(f"view: {server.url}", err=True)
    notifier.ready(f"serving {server.url}")
    tick = min(5.0, notifier.ping_interval_s or 5.0)
    try:
        while not stop.wait(tick):
            if server.alive():  # WATCHDOG=1 only while the feed and the HTTP threads both run
                notifier.watchdog()
            notifier.status(f"{server.url}: {server.hub.link['detail']}; {len(server.hub.clients)} browser(s)")
    finally:
        notifier.stopping()
        server.stop()
        notifier.close()
