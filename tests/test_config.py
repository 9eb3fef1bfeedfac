"""RestoreParams: presets mirror the official defaults; invalid values give clear errors or warnings.

The official CLI defaults (prompts, cfg scale) are read from the e2e fixtures: the values the official code ran
with where a run did not pass the flag. Step counts are retyped from the official inference.py (no fixture run
uses the default step count).
"""
from __future__ import annotations

import json

import pytest

from diffbir_core.config import PRESETS, RestoreParams


def test_presets_mirror_official_defaults():
    assert PRESETS["v1-general"].cfg_scale == 1.0 and PRESETS["v1-general"].steps == 50
    assert PRESETS["v1-general"].guidance.rule == "v1" and PRESETS["v1-general"].guidance.repeat == 5
    v2 = PRESETS["v2"]
    assert (v2.sampler, v2.steps, v2.cfg_scale) == ("spaced", 50, 4.0)
    assert v2.cleaner_for_task() == "bsrnet" and v2.replace(task="denoise").cleaner_for_task() == "scunet_psnr"
    v21 = PRESETS["v2.1"]
    assert v21.stage2.parameterization == "v" and v21.stage2.zero_snr and v21.sampler == "edm_dpm++_3m_sde"
    assert PRESETS["offline"].stage2 is None and PRESETS["offline"].cleaner_for_task() == "offline"
    for p in PRESETS.values():
        assert p.validate() == p


def _official_defaults(e2e_dir, run: str, flags: tuple[str, ...]) -> dict:
    """The arguments the official pipeline ran with in ``run``, checking the flags were left at their defaults."""
    r = json.loads((e2e_dir / "meta.json").read_text())["runs"][run]
    assert r["status"]["ok"] and not set(flags) & set(r["argv"]), (run, r["argv"])
    return r["pipeline_run_args"]


@pytest.mark.e2e
def test_presets_use_the_official_cli_defaults(e2e_dir):
    # v2 = v2.0.0 inference.py (`--version v2` without --cfg_scale / --pos_prompt / --neg_prompt)
    got = _official_defaults(e2e_dir, "v200_sr_spaced", ("--cfg_scale", "--pos_prompt", "--neg_prompt"))
    v2 = PRESETS["v2"]
    assert (v2.cfg_scale, v2.pos_prompt, v2.neg_prompt) == (got["cfg_scale"], got["pos_prompt"], got["neg_prompt"])
    # v2.1 = HEAD inference.py with --captioner none (the long default prompts)
    got = _official_defaults(e2e_dir, "h21_sr", ("--pos_prompt", "--neg_prompt"))
    v21 = PRESETS["v2.1"]
    assert (v21.pos_prompt, v21.neg_prompt) == (got["pos_prompt"], got["neg_prompt"])


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
    (dict(pos_prompt="word " * 80), "at most 77"),
])
def test_invalid_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RestoreParams.from_preset("v2", **kw).validate()


def test_soft_fixes_warn():
    with pytest.warns(UserWarning, match="outside"):
        p = RestoreParams.from_preset("v2", strength=3.0).validate()
    assert p.strength == 2.0
    with pytest.warns(UserWarning, match="1 step"):
        assert RestoreParams.from_preset("v2", steps=1).validate().steps == 2
