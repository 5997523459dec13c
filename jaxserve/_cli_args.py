"""Command-line arguments of the jaxserve subcommands; the shared ones live in :mod:`jaxserve.cli_args`."""

from __future__ import annotations

import argparse  # noqa: F401

from jaxserve.cli_args import add_model_args  # noqa: F401  (the public home; kept for old importers)
