"""RestoreParams: presets mirror the official defaults; invalid values give clear errors or warnings.

The official CLI defaults (prompts, cfg scale) are read from the e2e fixtures: the values the official code ran
with where a run did not pass the flag. Step counts are retyped from the official inference.py (no fixture run
uses the default step count).
"""

from __future__ import annotations

import json

import pytest

from diffbir_core.config import FLAT_NAMES, OFFICIAL_NEGATIVE_PROMPT, PRESETS, SAMPLERS, RestoreParams, TaskCleaners


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


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(steps=0), "steps must be >= 1"),
        (dict(cfg_scale=-1.0), "cfg_scale must be >= 0"),
        (dict(guidance__scale=-0.1), "guidance scale must be >= 0"),
        (dict(guidance__repeat=0), "repeat must be >= 1"),
        (dict(sampler="euler"), "unknown sampler"),
        (dict(color_fix="magic"), "unknown color_fix"),
        (dict(upscale=0.0), "upscale"),
    ],
)
def test_invalid_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RestoreParams.from_preset("v2", **kw).validate()


def test_soft_fixes_warn():
    with pytest.warns(UserWarning, match="outside"):
        p = RestoreParams.from_preset("v2", strength=3.0).validate()
    assert p.strength == 2.0
    with pytest.warns(UserWarning, match="1 step"):
        assert RestoreParams.from_preset("v2", steps=1).validate().steps == 2


@pytest.mark.parity
def test_negative_prompt_is_the_official_one(parity_dir):
    """Independent source: the prompt the official code ran with (fixture meta.json), not our constant."""
    import json

    neg = json.loads((parity_dir / "meta.json").read_text())["prompts"]["neg"]
    assert PRESETS["v2"].neg_prompt == neg and OFFICIAL_NEGATIVE_PROMPT == neg  # v2.1: HEAD's own (below)


def test_one_sampler_list_and_cleaners_inside_the_presets():
    from diffbir_core.diffusion.k_samplers import SAMPLER_KNOBS
    from diffbir_core.diffusion.registry import SAMPLER_NAMES

    assert SAMPLERS is SAMPLER_NAMES and set(SAMPLER_KNOBS) == set(SAMPLERS) and len(SAMPLERS) == 14
    assert PRESETS["v2"].cleaners == TaskCleaners("bsrnet", "swinir_face", "scunet_psnr")
    assert PRESETS["v2.1"].replace(task="face").cleaner_for_task() == "swinir_face"
    assert PRESETS["v2"].replace(cleaner="offline").cleaner_for_task() == "offline"  # explicit cleaner wins
    assert PRESETS["v1-general"].replace(cleaners__sr="bsrnet").cleaner_for_task() == "bsrnet"


def test_from_flat_maps_every_name_once():
    p = RestoreParams.from_flat(
        {
            "preset": "v2",
            "cfg_scale": 3,
            "guidance_scale": 0.5,
            "guidance_start": 800,
            "max_faces": 2,
            "face_backend": "dlib",
            "aligned": False,
            "tile_size": 256,
            "latent_stride": 40,
            "max_memory": 6,
            "tiled": False,
            "seed": -1,
            "steps": 20.0,
            "task": "face",
            "upscale": None,
        }
    )
    assert p == RestoreParams.from_preset(
        "v2",
        cfg_scale=3.0,
        guidance__scale=0.5,
        guidance__t_start=800,
        face__max_faces=2,
        face__backend="dlib",
        face__aligned=False,
        tiles__cleaner_tile=256,
        tiles__latent_stride=40,
        tiles__max_memory_gb=6.0,
        tiles__enabled=False,
        seed=None,
        steps=20,
        task="face",
    )
    assert isinstance(p.steps, int) and isinstance(p.cfg_scale, float)
    assert RestoreParams.from_flat({}) == PRESETS["offline"]  # nothing given: the offline preset
    # every flat name reaches a real (nested) field
    for name, (path, _) in FLAT_NAMES.items():
        outer, _, inner = path.partition("__")
        base = PRESETS["v2"]  # a preset with a stage 2 (stage2__sd / stage2__control)
        assert hasattr(base, outer) and (not inner or hasattr(getattr(base, outer), inner)), name


@pytest.mark.parametrize(
    "values, msg",
    [
        ({"cfg_scal": 2.0}, "unknown parameter name"),
        ({"steps": "ten"}, "steps must be a number"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"cfg_scale": True}, "cfg_scale must be a number"),
        ({"rescale_cfg": 1}, "rescale_cfg must be true or false"),
        ({"sampler": 3}, "sampler must be a string"),
        ({"preset": "v2", "steps": 0}, "steps must be >= 1"),
        ({"max_faces": 0}, "max_faces"),
        ({"preset": "v9"}, "unknown preset"),
    ],
)
def test_from_flat_errors(values, msg):
    with pytest.raises(ValueError, match=msg):
        RestoreParams.from_flat(values)


def test_official_prompt_assembly():
    """HEAD loop.py:166-169: ", ".join of the non-empty [caption, pos_prompt]; v2.1 preset = HEAD defaults."""
    from diffbir_core.prompts import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT, assemble_prompt

    assert assemble_prompt("", DEFAULT_POS_PROMPT) == DEFAULT_POS_PROMPT  # --captioner none
    assert assemble_prompt("a red house", "sharp") == "a red house, sharp"
    assert assemble_prompt("a red house", "") == "a red house" and assemble_prompt(None, None) == ""
    v21 = PRESETS["v2.1"]
    assert (v21.pos_prompt, v21.neg_prompt) == (DEFAULT_POS_PROMPT, DEFAULT_NEG_PROMPT)
