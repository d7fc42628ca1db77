"""``python -m pneumobatch``: the same as the ``pneumobatch`` command."""

from pneumobatch.cli import main

main()
