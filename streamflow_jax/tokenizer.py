"""CLIP's byte-level BPE tokenizer, from a pipeline's ``tokenizer/`` files, with ``tokenizers``.

A directory with ``tokenizer.json`` loads it as is. One with only CLIP's ``vocab.json`` and
``merges.txt`` (what SD 1.x/2.x pipelines ship) gets the tokenizer CLIP defines: NFC,
whitespace folding and lowercasing; CLIP's word-splitting pattern and byte-level encoding;
BPE with the ``</w>`` end-of-word suffix; ``<|startoftext|> ... <|endoftext|>`` around each
prompt. No transformers and no torch at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's split: its special tokens, English contractions, letter runs, single digits,
# runs of anything else that is not whitespace
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer:
    """Prompts -> ``[B, max_length]`` int32 token ids, truncated and padded as SD pipelines do.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` producing ``BOS ... EOS``.
        pad_token: padding token (SD 1.x: ``<|endoftext|>``; SD 2.x: ``!``).
        max_length: tokens per prompt, special tokens included (77 for CLIP).
    """

    def __init__(self, tokenizer, *, pad_token: str = EOS, max_length: int = 77):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.max_length = max_length
        self._tok = tokenizer
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def from_dir(cls, path) -> CLIPTokenizer:
        """A pipeline's ``tokenizer/`` directory."""
        path = Path(path)
        config = _read(path / "tokenizer_config.json")
        special = _read(path / "special_tokens_map.json")
        pad = _token(config.get("pad_token")) or _token(special.get("pad_token")) or EOS
        max_length = int(config.get("model_max_length", 77))
        max_length = 77 if max_length > 10_000 else max_length  # "very large" means unset
        if (path / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(path / "tokenizer.json")), pad_token=pad, max_length=max_length)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        for f in (vocab, merges):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (a CLIP tokenizer needs vocab.json and merges.txt, or tokenizer.json)")
        return cls(build_clip_bpe(vocab, merges, pad_token=pad), pad_token=pad, max_length=max_length)

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        return np.array([e.ids for e in self._tok.encode_batch(prompts)], np.int32)

    def tokens(self, prompt: str) -> list[str]:
        """The token strings of one prompt (for inspection)."""
        return self._tok.encode(prompt).tokens


def build_clip_bpe(vocab_file: Path, merges_file: Path, pad_token: str = EOS):
    """CLIP's tokenizer assembled from ``tokenizers`` components (see the module docstring).

    The special tokens, the pad token included, are registered as such, as transformers does:
    so SD 2.x's pad token ``!`` typed in a prompt is matched whole, before BPE.
    """
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        unk_token=EOS, fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for special in (BOS, EOS):
        if special not in vocab:
            raise ValueError(f"{vocab_file}: no {special!r} in the vocabulary")
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False,
                                                      add_prefix_space=False)
    tok.add_special_tokens(list(dict.fromkeys([BOS, EOS, pad_token])))
    return tok


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token(value) -> str | None:
    """A special token as tokenizer configs write it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value
