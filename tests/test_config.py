"""RestoreParams: presets mirror the official defaults; invalid values give clear errors or warnings."""
from __future__ import annotations

import pytest

from diffbir_core.config import OFFICIAL_NEGATIVE_PROMPT, PRESETS, RestoreParams


def test_presets_mirror_official_defaults():
    assert PRESETS["v1-general"].cfg_scale == 1.0 and PRESETS["v1-general"].steps == 50
    assert PRESETS["v1-general"].guidance.rule == "v1" and PRESETS["v1-general"].guidance.repeat == 5
    v2 = PRESETS["v2"]
    assert (v2.sampler, v2.steps, v2.cfg_scale, v2.neg_prompt) == ("spaced", 50, 4.0, OFFICIAL_NEGATIVE_PROMPT)
    assert v2.cleaner_for_task() == "bsrnet" and v2.replace(task="denoise").cleaner_for_task() == "scunet_psnr"
    v21 = PRESETS["v2.1"]
    assert v21.stage2.parameterization == "v" and v21.stage2.zero_snr and v21.sampler == "edm_dpm++_3m_sde"
    assert PRESETS["offline"].stage2 is None and PRESETS["offline"].cleaner_for_task() == "offline"
    for p in PRESETS.values():
        assert p.validate() == p


def test_nested_replace():
    p = RestoreParams.from_preset("v2", guidance__scale=0.3, face__max_faces=2, steps=7)
    assert p.guidance.scale == 0.3 and p.guidance.space == "rgb" and p.face.max_faces == 2 and p.steps == 7
    with pytest.raises(ValueError, match="unknown preset"):
        RestoreParams.from_preset("v3")


@pytest.mark.parametrize("kw, msg", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(cfg_scale=-1.0), "cfg_scale must be >= 0"),
    (dict(guidance__scale=-0.1), "guidance scale must be >= 0"),
    (dict(guidance__repeat=0), "repeat must be >= 1"),
    (dict(sampler="euler"), "unknown sampler"),
    (dict(color_fix="magic"), "unknown color_fix"),
    (dict(upscale=0.0), "upscale"),
])
def test_invalid_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RestoreParams.from_preset("v2", **kw).validate()


def test_soft_fixes_warn():
    with pytest.warns(UserWarning, match="at most 77"):  # truncated like the official tokenizer, not refused
        RestoreParams.from_preset("v2", pos_prompt="word " * 80).validate()
    with pytest.warns(UserWarning, match="outside"):
        p = RestoreParams.from_preset("v2", strength=3.0).validate()
    assert p.strength == 2.0
    with pytest.warns(UserWarning, match="1 step"):
        assert RestoreParams.from_preset("v2", steps=1).validate().steps == 2


def test_official_prompt_assembly():
    """HEAD loop.py:166-169: ", ".join of the non-empty [caption, pos_prompt]; v2.1 preset = HEAD defaults."""
    from diffbir_core.prompts import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT, assemble_prompt

    assert assemble_prompt("", DEFAULT_POS_PROMPT) == DEFAULT_POS_PROMPT  # --captioner none
    assert assemble_prompt("a red house", "sharp") == "a red house, sharp"
    assert assemble_prompt("a red house", "") == "a red house" and assemble_prompt(None, None) == ""
    v21 = PRESETS["v2.1"]
    assert (v21.pos_prompt, v21.neg_prompt) == (DEFAULT_POS_PROMPT, DEFAULT_NEG_PROMPT)
