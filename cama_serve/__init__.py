"""``cama-serve``: the one command for what users do with the service (``cama_serve.cli``)."""
