"""Jobs: the queue, typed job specs, the worker and one module per kind of job (fit, basis, head alignment)."""
