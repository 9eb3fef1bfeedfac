"""OpenCLIP ViT-H/14 text tower (stage 2's prompt encoder) and its offline tokenizer.

DiffBIR conditions the SD 2.1 UNet on ``c_txt`` = the OpenCLIP text transformer's PENULTIMATE layer
followed by ``ln_final`` (paper arXiv 2308.15070, "Stage 2"; official ``FrozenOpenCLIPEmbedder(layer="penultimate")``):

    tokens = [SOT] + BPE(prompt) + [EOT], zero-padded to 77
    x = token_embedding(tokens) + positional_embedding          # [B, 77, width]
    x = blocks[0 .. L-2](x, causal mask)                        # the last block is never run
    c_txt = ln_final(x)                                         # [B, 77, width], all positions

The blocks are open_clip's own ``Transformer`` (pre-LN, ``nn.MultiheadAttention`` with a packed
``in_proj_weight``, GELU MLP ratio 4, LayerNorm eps 1e-5), so the module's keys are exactly the official
``cond_stage_model.model.<key>`` names. Only the blocks that run are built (``layers - 1`` for
"penultimate"): the unused last block, ``text_projection`` and ``logit_scale`` of the official file are
reported as unused by the loaders instead of being held in memory. This also matches the diffusers
SD 2.1 ``text_encoder`` (a 23-layer ``CLIPTextModel``), see `convert.text_from_transformers`.

Tokenizer: open_clip's ``SimpleTokenizer`` ships its BPE vocabulary inside the wheel (works offline).
A prompt longer than the context is truncated exactly as the official tokenizer does (HEAD
``diffbir/model/open_clip/tokenizer.py:183-185``: keep the first 77 ids, force the last to EOT), with a
`PromptTruncatedWarning` saying how many tokens were dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "OpenCLIPTextEncoder",
    "PromptTooLongError",
    "PromptTruncatedWarning",
    "count_tokens",
    "tokenize",
    "TEXT_LAYERS",
]

# name of the output layer -> how many of the last blocks are skipped (official ``layer_idx``)
TEXT_LAYERS = {"last": 0, "penultimate": 1}


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the text encoder's context (77 for OpenCLIP); kept for callers that
    want to refuse long prompts themselves (`tokenize` truncates and warns)."""


class PromptTruncatedWarning(UserWarning):
    """A prompt was cut to the text encoder's context like the official tokenizer does."""


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def count_tokens(prompt: str) -> int:
    """Number of tokens ``prompt`` occupies in the context, including the SOT and EOT tokens."""
    return len(_tokenizer().encode(prompt)) + 2


def tokenize(prompts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """Token ids ``[B, context_length]`` (int64) exactly as the official OpenCLIP tokenizer makes them.

    Longer prompts are truncated like the official tokenizer (first ``context_length`` ids, the last one
    replaced by EOT), with a `PromptTruncatedWarning` naming every truncated prompt.
    """
    import warnings

    if isinstance(prompts, str):
        raise TypeError("tokenize() takes a list of prompts, not a single string")
    tok = _tokenizer()
    out = torch.zeros(len(prompts), context_length, dtype=torch.long)
    too_long = []
    for i, p in enumerate(prompts):
        ids = [tok.sot_token_id] + tok.encode(p) + [tok.eot_token_id]
        if len(ids) > context_length:
            too_long.append(f"prompt {i} has {len(ids)} tokens ({p[:60]!r}{'...' if len(p) > 60 else ''})")
            ids = ids[:context_length]
            ids[-1] = tok.eot_token_id
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    if too_long:
        warnings.warn(
            f"prompt truncated to the text encoder's {context_length} tokens (including start/end), as the "
            "official tokenizer does: " + "; ".join(too_long),
            PromptTruncatedWarning,
            stacklevel=2,
        )
    return out


class OpenCLIPTextEncoder(nn.Module):
    """OpenCLIP text transformer returning the per-token features of layer ``layer`` after ``ln_final``.

    Keys: ``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.<i>.*``,
    ``ln_final.*`` (identical to the official ``cond_stage_model.model.*`` keys).
    """

    def __init__(
        self,
        width: int = 1024,
        heads: int = 16,
        layers: int = 24,
        context_length: int = 77,
        vocab_size: int = 49408,
        layer: str = "penultimate",
    ):
        super().__init__()
        from open_clip.transformer import LayerNorm, Transformer

        if layer not in TEXT_LAYERS:
            raise ValueError(f"text layer must be one of {sorted(TEXT_LAYERS)}, got {layer!r}")
        self.width, self.heads, self.layers = width, heads, layers
        self.context_length, self.vocab_size, self.layer = context_length, vocab_size, layer
        self.blocks_run = layers - TEXT_LAYERS[layer]
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(
            width=width,
            layers=self.blocks_run,
            heads=heads,
            mlp_ratio=4.0,
            act_layer=nn.GELU,
            norm_layer=LayerNorm,
            batch_first=True,
        )
        self.ln_final = LayerNorm(width)  # eps 1e-5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return tokenize(prompts, self.context_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``[B, 77]`` int64 -> features ``[B, 77, width]``."""
        x = self.token_embedding(tokens) + self.positional_embedding  # [B, L, width]
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)  # causal: -inf above diag
        for block in self.transformer.resblocks:
            x = block(x, attn_mask=mask)
        return self.ln_final(x)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``c_txt`` ``[B, 77, width]`` on the module's device."""
        tokens = self.tokenize(prompts).to(self.token_embedding.weight.device)
        return self(tokens)


# ----------------------------------------------------------------------------------------------------------
# prompt embedding cache (moved from tiling.py)
# ----------------------------------------------------------------------------------------------------------
__all__ += ["TextEmbeddingCache"]


class TextEmbeddingCache:
    """``encode(prompts) -> c_txt`` that runs the text encoder once per distinct prompt (LRU, ``max_entries``)."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_entries: int = 32) -> None:
        self.encode, self.max_entries = encode, max_entries
        self._cache: dict[str, torch.Tensor] = {}
        self.misses = 0

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            if p in self._cache:
                self._cache[p] = self._cache.pop(p)  # most recently used last
            else:
                self.misses += 1
                with torch.no_grad():
                    self._cache[p] = self.encode([p]).detach()
                while len(self._cache) > self.max_entries:
                    self._cache.pop(next(iter(self._cache)))
            out.append(self._cache[p])
        return torch.cat(out)
