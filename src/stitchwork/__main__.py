"""``python -m stitchwork``: the command line."""

from stitchwork.interfaces.cli.app import main

main()
