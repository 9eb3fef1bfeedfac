"""Official default prompts and the official prompt assembly.

* `DEFAULT_POS_PROMPT` / `DEFAULT_NEG_PROMPT`: DiffBIR v2.1's CLI defaults (HEAD ``inference.py:42-52``,
  used as the ``--pos_prompt`` / ``--neg_prompt`` defaults at ``inference.py:172-189``).
* `V2_NEG_PROMPT`: v2.0.0's negative prompt (v2.0.0 ``inference.py:46``; also the README's ECCV command).
* `assemble_prompt(caption, pos)`: HEAD ``loop.py:166-169``: ``", ".join(t for t in [caption, pos] if t)``
  (the captioner's text first, empty parts dropped).
"""

from __future__ import annotations

__all__ = ["DEFAULT_NEG_PROMPT", "DEFAULT_POS_PROMPT", "V2_NEG_PROMPT", "assemble_prompt"]

DEFAULT_POS_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, "
    "hyper detailed photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, "
    "skin pore detailing, hyper sharpness, perfect without deformations."
)

DEFAULT_NEG_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, "
    "CG Style, 3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, "
    "signature, jpeg artifacts, deformed, lowres, over-smooth."
)

V2_NEG_PROMPT = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"


def assemble_prompt(caption: str | None, pos_prompt: str | None) -> str:
    """The positive prompt the official loop hands to the pipeline: caption, then the user's prompt."""
    return ", ".join(t for t in (caption, pos_prompt) if t)
