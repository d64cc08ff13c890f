"""Local storage: blob files (blobs.py) and metadata (metadata.py)."""
