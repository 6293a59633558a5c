"""Data layer: raw sources -> manifest (labels, seeded splits, hashes) -> the validation gate.

Modules: `manifest` (the Parquet manifest), `paths` (paths that may not leave the data root),
`sources` (per-source split rules), `fetch` (materialising sources for get-data), `images`
(guarded decoding, one-read file facts), `validation` (the Great Expectations gate).
"""
