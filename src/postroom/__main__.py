"""``python -m postroom`` is the ``postroom`` command."""

from postroom.admin.cli import main

main()
