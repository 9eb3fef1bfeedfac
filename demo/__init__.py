"""Gradio demo package: `demo.app.build_demo()` builds the app, `python demo/app.py` serves it.

Nothing is imported or built here; see `demo/app.py` and `demo/README.md` (Hugging Face Space card).
"""
