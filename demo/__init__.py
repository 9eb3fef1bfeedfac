"""Gradio demo package: `demo.app.build_demo()` builds the app, `python demo/app.py` serves it.

`demo.backend` (parameters, weights status, the run; no gradio), `demo.ui` (the gradio layout), `demo.app`
(entry point). Nothing is imported or built here; `demo/README.md` is the Hugging Face Space card.
"""
