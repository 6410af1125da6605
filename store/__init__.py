"""The model store: versioned registry, version artifacts, serving data, adaptation jobs.

Free of any web framework: the API (``app``), the Celery worker (``worker``) and the training
command lines (``training.export_model``) all use it. Its errors carry a machine-readable
``reason`` and no HTTP status; ``app.errors`` maps them to HTTP.
"""
