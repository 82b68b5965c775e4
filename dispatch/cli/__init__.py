"""The ``dispatch`` command line: ``main`` builds the parser (commands of other rooms and of
installed plugins, such as the load-test kit, register through ``add_commands``) and turns
expected errors into one line. May import every room of ``dispatch``; never ``loadtest``.
"""

from dispatch.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
