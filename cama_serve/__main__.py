"""``python -m cama_serve``: the same as the ``cama-serve`` command."""

from cama_serve.cli import main

if __name__ == "__main__":
    main()
