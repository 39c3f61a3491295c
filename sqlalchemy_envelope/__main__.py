"""``python -m sqlalchemy_envelope`` and the ``sqlalchemy-envelope`` script.

Loading the command (SQLAlchemy, cryptography, click, the package) takes
most of a second; it happens here, inside a Ctrl-C guard, so that Ctrl-C then
ends as it does during the command: one line, exit 130, no traceback. The
package's ``__init__`` imports nothing, so nothing runs outside the guard but
Python's own start.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as command
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was done (the command was starting)\n")
        raise SystemExit(130) from None
    command(prog_name="sqlalchemy-envelope")


if __name__ == "__main__":
    main()
