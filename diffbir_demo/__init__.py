"""Gradio demo package: `diffbir_demo.app.build_demo()` builds the app, `python diffbir_demo/app.py` serves it.

`diffbir_demo.backend` (parameters, weights status, the run; no gradio), `diffbir_demo.ui` (the gradio layout), `diffbir_demo.app`
(entry point). Nothing is imported or built here; `diffbir_demo/README.md` is the Hugging Face Space card.
"""
