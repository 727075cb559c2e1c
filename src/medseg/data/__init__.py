"""Data: format detection, ingest (with its checks and `medseg doctor`), the preprocessing rules every path
shares, fingerprint, split, the phantom, the training loader."""
