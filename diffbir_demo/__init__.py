"""Gradio demo package: `diffbir_demo.app.build_demo()` builds the app, `python diffbir_demo/app.py` serves it.

`diffbir_demo.backend` (parameters, weights status, the run, GPU time per request; no gradio), `diffbir_demo.ui`
(the gradio layout, ``@spaces.GPU`` when installed), `diffbir_demo.app` (entry point). Nothing is imported or
built here. The Hugging Face Space card is the front matter of the root README.md (``app_file: app.py``).
"""
