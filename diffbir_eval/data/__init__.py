"""``python -m diffbir_eval.data``: look at, verify and fetch the registered test sets.

    python -m diffbir_eval.data list                 # every set: source, licence, file count, size, checksums known?
    python -m diffbir_eval.data check NAME DIR       # count, names and sha256 of a local copy
    python -m diffbir_eval.data fetch NAME DIR       # download what can be downloaded directly, verified file by file
    python -m diffbir_eval.data checksum NAME DIR    # (maintainers) rewrite assets/checksums/NAME.tsv from DIR

The command only: its library is `diffbir_eval.registry` (`check`, `fetch`, `checksum_list`, `write_checksums`,
`markdown_table`), its CLI ``data/__main__.py``. Exit status: 0 fine, 1 check failed, 2 bad arguments / nothing
to download / network failure.
"""
