"""One Klein class per protocol; the root resource dispatches by first path segment."""
