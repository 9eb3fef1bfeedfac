"""Experiment scripts (``python -m experiments.<name>.<script>``); their outputs live in ``results/<name>/``."""
