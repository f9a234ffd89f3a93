"""``python -m accel``: the same as the ``accel`` command."""

from accel.cli.app import main

main()
