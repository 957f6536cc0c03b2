"""``python -m charnn``: the same as the ``charnn`` command."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="charnn")
