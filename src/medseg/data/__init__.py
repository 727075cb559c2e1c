"""Data: format detection, ingest, fingerprint, split, the phantom, the training loader."""
