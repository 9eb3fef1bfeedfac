"""Captioners (diffbir_core/captioner.py) against the official HEAD behaviour (diffbir/utils/caption.py).

The LLaVA test builds a tiny random LLaVA the way transformers' own tests do (LlavaConfig from a tiny CLIP
vision config + a tiny Llama text config) with an offline word-level tokenizer, saves it to a folder in the
llava-hf layout, and checks our caption against transformers' own ``generate(do_sample=False)`` on inputs
built here, independently, following the official code: the llava_v1 prompt written out by hand from
llava/conversation.py:325-335, chunked tokenisation (mm_utils.py:185-204), expand2square with PIL
(mm_utils.py:152-163). Known answers: official constants (question, 512 tokens, default 4 bits).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import socket
import sys
import types
import warnings

import numpy as np
import pytest

from diffbir_core import captioner as cap
from diffbir_core.weights import WeightsError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Written out from llava/conversation.py:325-335 (conv_llava_v1) + get_prompt (SeparatorStyle.TWO) and
# caption.py:84/:97: "<image>\n" + question as the USER message, ASSISTANT left open.
OFFICIAL_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\n"
    "Please give me a very short description of this image. ASSISTANT:"
)
N_NEW = 12  # keep the random model's greedy run short


# ----------------------------------------------------------------------------------------------
# tiny LLaVA folder


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(OFFICIAL_PROMPT.replace("<image>", " ").split() + ["cat", "dog", "sky", "tree", "red", "blue"]))
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {t: i for i, t in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # Llama BOS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    folder = tmp_path_factory.mktemp("tiny-llava")
    tokenizer = _tiny_tokenizer()
    # CLIP mean/std as in the real llava-hf preprocessor (OpenAI CLIP values).
    ip = CLIPImageProcessor(
        size={"shortest_edge": 30},
        crop_size={"height": 30, "width": 30},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    vision = CLIPVisionConfig(
        image_size=30,
        patch_size=6,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        max_position_embeddings=256,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ip.save_pretrained(folder)
    return folder


def _reference_caption(folder, rgb: np.ndarray, max_new_tokens: int) -> tuple[str, list[int], torch.Tensor]:
    """transformers' own greedy generate on inputs built the official way, without diffbir_core."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(folder)
    ip = AutoImageProcessor.from_pretrained(folder, backend="pil")
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    # expand2square (mm_utils.py:152-163) with PIL, background int(mean*255) (mm_utils.py:171)
    img = Image.fromarray(rgb)
    w, h = img.size
    side = max(w, h)
    sq = Image.new("RGB", (side, side), tuple(int(m * 255) for m in ip.image_mean))
    sq.paste(img, ((side - w) // 2, (side - h) // 2))
    pixel_values = ip(images=sq, return_tensors="pt")["pixel_values"]
    # tokenizer_image_token (mm_utils.py:185-204), the one image slot widened to one token per patch feature
    before, after = OFFICIAL_PROMPT.split("<image>")
    n_img = (30 // 6) ** 2
    ids = tok(before).input_ids + [model.config.image_token_id] * n_img + tok(after).input_ids[1:]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_values,
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    text = tok.batch_decode(out[:, len(ids) :], skip_special_tokens=True)[0].strip()
    return text, ids, pixel_values


def _image(h=20, w=28, seed=0) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def test_llava_caption_matches_transformers_greedy_generate(tiny_llava):
    rgb = _image()
    c = cap.LLaVACaptioner("cpu", bits="16", model_path=tiny_llava, max_new_tokens=N_NEW)
    assert c.model is None  # lazy: nothing loaded before the first call
    got = c(rgb)
    want, want_ids, want_pixels = _reference_caption(tiny_llava, rgb, N_NEW)
    assert want  # the random model says something, so equality is not trivially ""
    assert got == want
    inputs = c.inputs(rgb)
    assert inputs["input_ids"][0].tolist() == want_ids
    assert torch.equal(inputs["pixel_values"], want_pixels)
    # float [0, 1] input (as read_image gives) is the same image
    assert c(rgb.astype(np.float32) / 255.0) == want


def test_llava_prompt_is_the_official_template(tiny_llava):
    c = cap.LLaVACaptioner("cpu", bits="16", model_path=tiny_llava)
    assert c.prompt == OFFICIAL_PROMPT
    assert "Please give me a very short description of this image." in c.prompt
    assert c.max_new_tokens == 512  # caption.py:120
    # the ids we send are the official prompt's chunks around the image slot
    c.load()
    ids = c.inputs(_image())["input_ids"][0].tolist()
    img_id = c.model.config.image_token_id
    first, last = ids.index(img_id), len(ids) - ids[::-1].index(img_id)
    decode = c.tokenizer.decode
    assert decode(ids[:first], skip_special_tokens=True).strip() == OFFICIAL_PROMPT.split("<image>")[0].strip()
    assert decode(ids[last:], skip_special_tokens=True).strip() == OFFICIAL_PROMPT.split("<image>")[1].strip()
    assert ids[0] == c.tokenizer.bos_token_id and ids.count(c.tokenizer.bos_token_id) == 1


def test_llava_square_image_is_not_padded(tiny_llava):
    rgb = _image(30, 30, seed=3)
    c = cap.LLaVACaptioner("cpu", bits="16", model_path=tiny_llava, max_new_tokens=N_NEW)
    assert c(rgb) == _reference_caption(tiny_llava, rgb, N_NEW)[0]


def test_llava_missing_weights_is_one_clear_error_without_download(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, **kw):
        calls.append((repo_id, kw))
        if not kw.get("local_files_only"):
            raise AssertionError("a download was attempted")
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFBIR_WEIGHTS_DIR", str(tmp_path / "weights"))
    c = cap.LLaVACaptioner("cpu", bits="16")  # construction finds nothing yet (lazy)
    with pytest.raises(WeightsError) as ei:
        c(_image())
    msg = str(ei.value)
    assert "llava-1.5-7b-hf" in msg and "llava-hf/llava-1.5-7b-hf" in msg
    assert str(tmp_path / "weights" / "llava-1.5-7b-hf") in msg  # where it looked
    assert "HF_HUB_OFFLINE=1" in msg and "hf download" in msg and "--captioner none" in msg
    assert calls and all(kw.get("local_files_only") for _, kw in calls)


def test_llava_explicit_folder_must_exist(tmp_path):
    c = cap.LLaVACaptioner("cpu", bits="16", model_path=tmp_path / "nope")
    with pytest.raises(WeightsError, match="nope"):
        c.load()


def test_llava_finds_folder_in_weights_dir(tiny_llava, tmp_path, monkeypatch):
    (tmp_path / "llava-1.5-7b-hf").symlink_to(tiny_llava, target_is_directory=True)
    assert cap.resolve_model_dir(cap.LLAVA_SPEC, weights_dir=tmp_path) == tmp_path / "llava-1.5-7b-hf"
    monkeypatch.setenv("DIFFBIR_WEIGHTS_DIR", str(tmp_path))
    assert cap.resolve_model_dir(cap.LLAVA_SPEC) == tmp_path / "llava-1.5-7b-hf"


def test_llava_quantisation_off_cuda_falls_back_with_notice():
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        c = cap.LLaVACaptioner("cpu", bits="4")
    assert c.bits == "16" and c.dtype_name == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cap.LLaVACaptioner("cpu", bits="16", dtype="bf16").dtype_name == "bf16"


def test_llava_quantisation_on_cuda_needs_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(cap.CaptionerError, match="pip install bitsandbytes"):
        cap.LLaVACaptioner("cuda", bits="4")
    c = cap.LLaVACaptioner("cuda:0", bits="16")  # nothing touches CUDA before the first call
    assert c.dtype_name == "fp16" and c.model is None  # official 16-bit is fp16 (builder.py:43)


def test_llava_bad_options():
    with pytest.raises(cap.CaptionerError, match="16, 8, 4"):
        cap.LLaVACaptioner("cpu", bits="2")
    with pytest.raises(cap.CaptionerError, match="dtype"):
        cap.LLaVACaptioner("cpu", bits="16", dtype="int8")


# ----------------------------------------------------------------------------------------------
# none / ram / factory


def test_no_captioner_gives_empty_caption():
    c = cap.NoCaptioner()
    assert isinstance(c, cap.Captioner)
    assert c(_image()) == "" and c(np.zeros((4, 5, 3), np.float32)) == ""
    with pytest.raises(ValueError, match="HxWx3"):
        c(np.zeros((4, 5), np.uint8))


def test_to_uint8_rgb():
    u8 = _image()
    assert np.array_equal(cap.to_uint8_rgb(u8.astype(np.float32) / 255.0), u8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cap.to_uint8_rgb(np.full((2, 2, 3), 2.0))
    with pytest.raises(ValueError, match="dtype"):
        cap.to_uint8_rgb(np.zeros((2, 2, 3), np.int64))


def test_ram_refuses_without_package_and_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ram" else real(n, *a))
    with pytest.raises(cap.CaptionerError) as ei:
        cap.make_captioner("ram", "cpu")
    msg = str(ei.value)
    assert "not on PyPI" in msg
    assert "pip install git+https://github.com/xinyu1205/recognize-anything.git" in msg
    assert "ram_plus_swin_large_14m.pth" in msg and "--captioner none" in msg


def test_ram_wiring_with_a_stand_in_package(tmp_path, monkeypatch):
    """The ram package is not installable here: a stand-in records what we call (official caption.py:156-171)."""
    seen = {}
    ram = types.ModuleType("ram")
    ram.__spec__ = importlib.machinery.ModuleSpec("ram", None)
    models = types.ModuleType("ram.models")

    def get_transform(image_size):
        seen["image_size"] = image_size
        return lambda pil: torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()

    class Model:
        def eval(self):
            return self

        def to(self, device):
            seen["device"] = device
            return self

    def ram_plus(pretrained, image_size, vit):
        seen.update(pretrained=pretrained, vit=vit, model_size=image_size)
        return Model()

    def inference_ram(x, model):
        seen["x"] = x
        return "armchair | blanket | lamp", "扶手椅 | 毯子 | 灯"

    ram.get_transform, ram.inference_ram, models.ram_plus, ram.models = get_transform, inference_ram, ram_plus, models
    monkeypatch.setitem(sys.modules, "ram", ram)
    monkeypatch.setitem(sys.modules, "ram.models", models)
    weights = tmp_path / "ram_plus_swin_large_14m.pth"
    with open(weights, "wb") as f:  # sparse file of the real size class (the size check rejects truncated files)
        f.truncate(3 * 1024**3)
    c = cap.make_captioner("ram", "cpu", weights_dir=tmp_path, llava_bit="4")
    rgb = _image()
    assert c(rgb) == "armchair, blanket, lamp"
    assert seen["pretrained"] == str(weights) and seen["vit"] == "swin_l"
    assert seen["image_size"] == seen["model_size"] == 384 and seen["device"] == "cpu"
    assert seen["x"].shape == (1, 3, 20, 28) and torch.equal(
        seen["x"][0].permute(1, 2, 0).byte(), torch.from_numpy(rgb)
    )


def test_factory_defaults_per_device(monkeypatch):
    assert cap.default_captioner("cpu") == "none" and cap.default_captioner("mps") == "none"
    assert cap.default_captioner("cuda") == "llava" and cap.default_captioner("cuda:1") == "llava"
    assert isinstance(cap.make_captioner(None, "cpu"), cap.NoCaptioner)
    assert isinstance(cap.make_captioner("auto", "cpu", llava_bit="4", weights_dir=None), cap.NoCaptioner)
    c = cap.make_captioner(None, "cuda", llava_bit="16")
    assert isinstance(c, cap.LLaVACaptioner) and c.bits == "16" and c.model is None
    assert cap.DEFAULT_LLAVA_BIT == "4" and cap.CAPTIONERS == ("none", "llava", "ram")  # inference.py:168-169, :285
    with pytest.raises(cap.CaptionerError, match="unknown captioner"):
        cap.make_captioner("blip", "cpu")
    with pytest.raises(cap.CaptionerError, match="no options"):
        cap.make_captioner("none", "cpu", question="hi")
