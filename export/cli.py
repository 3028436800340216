"""`edge-export`: the workstation command line (fit, train, tensorrt, keygen, sign).

User errors (`InspectorError`) print one line and exit 2, like the device CLI.
"""

from __future__ import annotations

import click

from edge_inspector import __version__
from edge_inspector.cli import OneLineErrorGroup, configure_logging


@click.group(cls=OneLineErrorGroup)
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Fit or train anomaly models on good images and export them as model bundles."""
    configure_logging(verbose)


def _register() -> None:
    from export.commands.demo import demo_command
    from export.commands.fit import fit_command
    from export.commands.sign import keygen_command, sign_command
    from export.commands.tensorrt import tensorrt_command
    from export.commands.train import train_command

    for command in (fit_command, train_command, tensorrt_command, demo_command, keygen_command, sign_command):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
