"""Prompt tokenizers from a pipeline's tokenizer directories, with ``tokenizers`` alone.

``CLIPTokenizer``: CLIP's byte-level BPE (``tokenizer/``, SD3's ``tokenizer_2/``). A
directory with ``tokenizer.json`` loads it as is. One with only CLIP's ``vocab.json`` and
``merges.txt`` (what SD 1.x/2.x pipelines ship) gets the tokenizer CLIP defines: NFC,
whitespace folding and lowercasing; CLIP's word-splitting pattern and byte-level encoding;
BPE with the ``</w>`` end-of-word suffix; ``<|startoftext|> ... <|endoftext|>`` around each
prompt.

``T5Tokenizer``: T5's SentencePiece unigram model (Flux's ``tokenizer_2/``, SD3's
``tokenizer_3/``), from ``tokenizer.json``, rebuilt the way transformers 5 rebuilds it.

No transformers, sentencepiece or torch at run time.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's split: its special tokens, English contractions, letter runs, single digits,
# runs of anything else that is not whitespace
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _prompt_list(prompts) -> list[str]:
    """One prompt or a sequence of them, as a list of strings, or a ValueError."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, list | tuple) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    return prompts


def _token_ids(tokenizer, prompts, limit: str, max_length: int) -> np.ndarray:
    """``[B, max_length]`` int32 ids of the prompts, from a tokenizer that truncates and pads;
    a ``UserWarning`` names the prompts that were cut, as diffusers warns."""
    prompts = _prompt_list(prompts)
    encodings = tokenizer.encode_batch(prompts)
    # named by their text: the batch may be a pipeline's own (negative prompts, a stream's tick)
    cut = list(dict.fromkeys(p for p, e in zip(prompts, encodings) if e.overflowing))
    if cut:
        shown = ", ".join(repr(p if len(p) <= 40 else p[:37] + "...") for p in cut[:3])
        more = f" and {len(cut) - 3} more" if len(cut) > 3 else ""
        warnings.warn(f"prompt(s) {shown}{more} longer than {limit} were truncated to {max_length} (as diffusers "
                      "does)", stacklevel=3)
    return np.array([e.ids for e in encodings], np.int32)


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
        """Token ids of each prompt, ``[B, max_length]`` int32; a longer prompt is truncated,
        with a ``UserWarning``, as diffusers does."""
        return _token_ids(self._tok, prompts, f"CLIP's limit of {self.max_length} tokens", self.max_length)

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


# ---------------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------------

T5_PAD, T5_EOS = "<pad>", "</s>"
T5_UNK_ID = 2  # transformers 5 builds T5's Unigram model with unk_id=2 whatever the file says
T5_MAX_LENGTH = 512  # T5's pretraining length, used when the config sets no sane model_max_length


class T5Tokenizer:
    """Prompts -> ``[B, max_length]`` int32 T5 token ids, as Flux and SD3 pipelines tokenize.

    Matches transformers 5's ``T5Tokenizer(prompts, padding="max_length", max_length=N,
    truncation=True)``: each prompt gets ``</s>`` appended (no BOS), is truncated on the right
    to ``max_length`` tokens counting that ``</s>`` (so an over-long prompt still ends in EOS),
    and is padded on the right with the pad id.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` that appends ``</s>`` (see ``build_t5_unigram``).
        max_length: tokens per prompt, EOS included (Flux-dev: 512; Flux-schnell and SD3: 256).
        pad_token: the padding token (T5: ``<pad>``, id 0).
    """

    def __init__(self, tokenizer, *, max_length: int = T5_MAX_LENGTH, pad_token: str = T5_PAD):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.max_length = int(max_length)
        self._tok = tokenizer
        self._tok.enable_truncation(max_length=self.max_length)  # the appended </s> counts
        self._tok.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def from_dir(cls, path, max_length: int | None = None) -> T5Tokenizer:
        """A pipeline's T5 tokenizer directory (Flux ``tokenizer_2/``, SD3 ``tokenizer_3/``).

        Args:
            path: the directory; it must hold ``tokenizer.json`` (``tokenizer_config.json`` is
                read for the special tokens and ``model_max_length`` when present).
            max_length: tokens per prompt (default: the config's ``model_max_length`` when
                it is set, else 512). Pipelines pass their ``max_sequence_length``.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` (a directory with only ``spiece.model``
                says how to make one).
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            if (path / "spiece.model").is_file():
                raise FileNotFoundError(
                    f"{file}: missing; the directory has only spiece.model, a SentencePiece model, and "
                    "reading it needs the sentencepiece package, which streamflow-jax does not depend on. "
                    "Write tokenizer.json once where transformers and sentencepiece are installed: "
                    f"T5TokenizerFast.from_pretrained({str(path)!r}).save_pretrained({str(path)!r})")
            raise FileNotFoundError(f"{file}: missing (a T5 tokenizer directory needs tokenizer.json)")
        config = _read(path / "tokenizer_config.json")
        pad = _token(config.get("pad_token")) or T5_PAD
        eos = _token(config.get("eos_token")) or T5_EOS
        if max_length is None:
            configured = config.get("model_max_length")
            # transformers writes a huge number (1e30) for "unset"
            sane = isinstance(configured, int | float) and 0 < configured <= 100_000
            max_length = int(configured) if sane else T5_MAX_LENGTH
        return cls(build_t5_unigram(file, eos_token=eos), max_length=max_length, pad_token=pad)

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """Token ids of each prompt, ``[B, max_length]`` int32.

        A prompt longer than ``max_length`` tokens is truncated, keeping its final ``</s>``, as
        diffusers does, with a ``UserWarning`` naming the limit.
        """
        return _token_ids(self._tok, prompts, f"the T5 limit of {self.max_length} tokens", self.max_length)

    def tokens(self, prompt: str) -> list[str]:
        """The token strings of one prompt, padding included (for inspection)."""
        return self._tok.encode(prompt).tokens


def build_t5_unigram(tokenizer_json: Path, eos_token: str = T5_EOS):
    """T5's tokenizer from a ``tokenizer.json``, rebuilt as transformers 5's ``T5Tokenizer`` does.

    transformers does not run the file's pipeline as is, so neither does this: the Unigram
    vocabulary is kept with ``unk_id=2`` and no byte fallback; of the normalizers only a
    ``Precompiled`` one (SentencePiece's character map) is kept, the others (whitespace
    stripping and folding written by older converters) are dropped; words are split on
    whitespace and each gets the ``▁`` prefix (``Metaspace``, prepended always); ``</s>`` is
    appended to each sequence. The added (special) tokens of the file stay, so ``<pad>`` or
    ``</s>`` typed in a prompt are matched whole.
    """
    from tokenizers import pre_tokenizers, processors

    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "Unigram" or len(model.get("vocab") or ()) <= T5_UNK_ID:
        raise ValueError(f"{tokenizer_json}: not a T5 (SentencePiece Unigram) tokenizer")
    spec["model"] = {**model, "unk_id": T5_UNK_ID, "byte_fallback": False}
    spec["normalizer"] = _precompiled(spec.get("normalizer"))
    spec["truncation"] = spec["padding"] = None  # set by T5Tokenizer
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"{tokenizer_json}: no {eos_token!r} in the vocabulary")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos_token}", pair=f"$A {eos_token} $B {eos_token}",
                                                       special_tokens=[(eos_token, eos_id)])
    return tok


def _precompiled(normalizer: dict | None) -> dict | None:
    """The ``Precompiled`` normalizer of a ``tokenizer.json`` (at the top or in a ``Sequence``), or None."""
    if not normalizer:
        return None
    if normalizer.get("type") == "Precompiled":
        return normalizer
    if normalizer.get("type") == "Sequence":
        return next((n for n in normalizer.get("normalizers", ()) if n.get("type") == "Precompiled"), None)
    return None
