"""`edge-export`: the workstation command line (fit, train, tensorrt).

User errors (`InspectorError`) print one line and exit 2, like the device CLI.
"""

from __future__ import annotations

import logging
import click

from edge_inspector import __version__
from edge_inspector.cli import OneLineErrorGroup


@click.group(cls=OneLineErrorGroup)
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Fit or train anomaly models on good images and export them as model bundles."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from .fit_command import fit_command

    main.add_command(fit_command)
    # -- other commands (train, tensorrt) are registered below --
    from .demo import demo_command

    main.add_command(demo_command)
    from .tensorrt_build import tensorrt_command

    main.add_command(tensorrt_command)
    from .train_command import train_command

    main.add_command(train_command)


_register()

if __name__ == "__main__":
    main()
