"""`adalabelhash serve`: a retrieval service for the registered model version holding an alias.

An encoder and the database codes it produced are one unit (codes of two versions cannot be
compared), so a version is loaded as a whole (loader.py: ONNX model from the registry, the
database logged by `evaluate` into the version's run), checked, then swapped in with one
reference assignment; a request keeps the unit it started with. index.py: exact or IVF binary
search with a stable tie order and the asymmetric rerank; app.py: the HTTP API.
"""
