"""Adapter and model files from where they are kept to a local directory, for the server and the DJL handler
alike: S3 (s3.py, s3_cache.py), safe archive unpacking (archive.py, safe_paths.py), what an adapter folder holds
(adapter_files.py), a registration's `src` to a local adapter directory (adapter_source.py), and their errors
(errors.py). docs/STORAGE.md."""
