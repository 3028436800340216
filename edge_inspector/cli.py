"""`edge-inspector`: the device-side command line (run, replay, subscribe, check-config).

Each command lives beside the code it drives and is registered here. User errors (`InspectorError`) are
printed as one line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from edge_inspector import __version__
from edge_inspector.core.errors import InspectorError


class OneLineErrorGroup(click.Group):
    """A click group that turns InspectorError into `error: ...` on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InspectorError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=OneLineErrorGroup)
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Visual inspection on the edge: run a model bundle on a camera or replay image folders."""
    configure_logging(verbose)


def configure_logging(verbose: bool) -> None:
    """One log format for both CLIs (journald adds its own timestamp, but the CLI runs elsewhere too)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from edge_inspector.service.app import check_config_command, run_command
    from edge_inspector.tools.info import info_command
    from edge_inspector.tools.labelset import labels_group
    from edge_inspector.tools.replay import replay_command
    from edge_inspector.tools.subscriber import subscribe_command
    from edge_inspector.tools.view import view_command

    for command in (run_command, check_config_command, replay_command, info_command, subscribe_command,
                    view_command, labels_group):
        main.add_command(command)
    _register_service_tools()


def _register_service_tools() -> None:
    from edge_inspector.core.keys import keys_command
    from edge_inspector.tools.control import control_command

    for command in (control_command, keys_command):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
