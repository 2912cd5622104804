"""ResiDual Serve: the HTTP service (FastAPI) around the ``residual`` library."""
