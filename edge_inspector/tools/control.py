"""`edge-inspector control ENDPOINT status|stats|set-threshold X|reload [DIR]|trigger [PART_ID]`: the control
socket from a shell.

Prints the reply as indented JSON. Exit status: 0 when the service accepted the command, 2 when it refused
it (the reply's one-line reason is printed as `error: ...`) or the arguments are wrong, 1 when no reply
came within --timeout; the error then names the likely cause, read from a second short connect's ZeroMQ
handshake: nothing bound there, the service requires CURVE, or it refused this CURVE key (CURVE refusals
send nothing back by design, but the handshake failure is visible on the client's socket monitor).
"""

from __future__ import annotations

import json
import sys

import click
import zmq

from edge_inspector.core.errors import ConfigError
from edge_inspector.core.keys import client_keys_option
from edge_inspector.core.wire import send_control
from edge_inspector.tools.subscriber import connectable, probe_endpoint

COMMANDS = ("status", "stats", "set-threshold", "reload", "trigger")


def build_request(command: str, argument: str | None) -> dict:
    """The JSON request for a CLI command (hyphens as on the command line, underscores on the wire)."""
    if command not in COMMANDS:
        raise ConfigError(f"control: unknown command {command!r} (expected one of {', '.join(COMMANDS)})")
    if command == "set-threshold":
        if argument is None:
            raise ConfigError("control set-threshold: give the new raw-score threshold, e.g. set-threshold 12.5")
        try:
            value = float(argument)
        except ValueError:
            raise ConfigError(f"control set-threshold: expected a number, got {argument!r}") from None
        return {"command": "set_threshold", "value": value}
    if command == "reload":
        return {"command": "reload", **({"bundle": argument} if argument else {})}
    if command == "trigger":  # camera.trigger external; the service validates the part id
        return {"command": "trigger", **({"part_id": argument} if argument else {})}
    if argument is not None:
        raise ConfigError(f"control {command}: takes no argument, got {argument!r}")
    return {"command": command}


@click.command("control")
@click.argument("endpoint")
@click.argument("command", metavar="status|stats|set-threshold X|reload [DIR]|trigger [PART_ID]")
@click.argument("argument", required=False)
@click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True,
              help="Seconds to wait for the reply (reload loads and warms up a model: allow for it).")
@click.option("--server-key", type=click.Path(dir_okay=False), default=None,
              help="CURVE: the service's public key file (NAME.key).")
@click.option("--client-key", type=click.Path(dir_okay=False), default=None,
              help="CURVE: this client's secret key file (NAME.key_secret), authorised in security.control_clients.")
def control_command(endpoint: str, command: str, argument: str | None, timeout_s: float, server_key: str | None,
                    client_key: str | None) -> None:
    """Send one command to a running service's control socket, e.g. tcp://127.0.0.1:5557 status."""
    request = build_request(command, argument)
    keys = client_keys_option(server_key, client_key)
    try:
        reply = send_control(connectable(endpoint), request, timeout_s=timeout_s, keys=keys)
    except TimeoutError as err:
        # Why: a silent timeout sent users hunting; a second short connect reads the handshake's outcome.
        cause = probe_endpoint(connectable(endpoint), zmq.REQ, keys, role="publish.control_endpoint")
        if cause.startswith("connected"):
            cause = ("the service accepts connections but did not answer in time: it is busy (a reload loads "
                     "and warms up a model: raise --timeout)")
        click.echo(f"error: {err}; {cause}", err=True)
        sys.exit(1)
    if not reply.get("ok"):
        click.echo(f"error: {reply.get('error', 'refused')}", err=True)
        sys.exit(2)
    click.echo(json.dumps(reply, indent=2))
