"""CLIP text encoders against transformers, and the tokenizer against transformers' CLIPTokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CLIP, randomize, write_tiny_clip_vocab

transformers = pytest.importorskip("transformers")

import streamflow_jax as sf  # noqa: E402
from streamflow_jax.cli import main as cli  # noqa: E402
from streamflow_jax.tokenizer import CLIPTokenizer  # noqa: E402

# The ids tell the two pooling rules apart: the highest id (529, legacy argmax) sits before the
# first EOS (528, current rule) in every row
POOL_IDS = np.array([[527, 5, 529, 9, 528, 528, 528, 528], [527, 529, 4, 6, 528, 10, 11, 528]])
LEGACY_POS, FIRST_EOS_POS = [2, 1], [4, 4]


@pytest.mark.parametrize("cls,act,legacy_eos", [("CLIPTextModel", "quick_gelu", True),
                                                ("CLIPTextModelWithProjection", "gelu", False)])
def test_clip_text_encoder_matches_transformers(tmp_path, cls, act, legacy_eos):
    """Hidden states and the pooled (projected) output; the pooling picks the legacy rule's
    position (eos_token_id 2: the highest id) or the current one's (the first EOS) as
    transformers does. Measured rel. errors <= 3.3e-7; pooling at the other rule's position is
    off by >= 0.32."""
    cfg = dict(CLIP, hidden_act=act, **({"eos_token_id": 2} if legacy_eos else {}))
    ref = randomize(getattr(transformers, cls)(transformers.CLIPTextConfig(**cfg)), 0, std=0.2).eval()
    ref.save_pretrained(tmp_path / "src")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 0
    model = sf.load(tmp_path / "dst")
    with torch.no_grad():
        want = ref(torch.from_numpy(POOL_IDS), output_hidden_states=True)
    got = model.module(POOL_IDS)
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))  # noqa: E731
    assert rel(got["last_hidden_state"], want.last_hidden_state) <= 3e-6
    assert rel(got["hidden_states"][-2], want.hidden_states[-2]) <= 3e-6  # penultimate
    assert len(got["hidden_states"]) == len(want.hidden_states)
    last = want.last_hidden_state.numpy()
    pos, other = (LEGACY_POS, FIRST_EOS_POS) if legacy_eos else (FIRST_EOS_POS, LEGACY_POS)
    at = lambda p: last[np.arange(2), p]  # noqa: E731
    if cls == "CLIPTextModel":
        np.testing.assert_array_equal(want.pooler_output.numpy(), at(pos))  # transformers' rule, as we read it
        assert rel(got["pooler_output"], want.pooler_output) <= 3e-6
        assert rel(at(other), want.pooler_output) > 0.1  # the ids do tell the rules apart
    else:
        with torch.no_grad():
            projected_other = ref.text_projection(torch.from_numpy(at(other))).numpy()
        assert rel(got["text_embeds"], want.text_embeds) <= 3e-6
        assert rel(projected_other, want.text_embeds) > 0.1


def test_clip_generic_transformers_fields_accepted_architecture_fields_strict(tmp_path, capsys):
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP))
    ref.save_pretrained(tmp_path / "src")
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**raw, "num_beams": 4, "output_scores": True}))
    assert sf.load(tmp_path / "src").config.hidden_size == 32  # generation settings do not matter
    (tmp_path / "src" / "config.json").write_text(json.dumps({**raw, "hidden_act": "relu"}))
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 1
    assert "unsupported: hidden_act='relu'" in capsys.readouterr().err
    (tmp_path / "src" / "config.json").write_text(json.dumps({**raw, "use_rope": True}))
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 1
    assert "unknown config field 'use_rope'" in capsys.readouterr().err





PROMPTS = [
    "a photo of the cat",
    "A PHOTO, of the cat!!! on a mat; isn't it? (really) #42 $9.99",
    "  spaced\tout\n\nprompt  ",
    "café naïve Ünïcödé — “quotes” 日本語 🙂 emoji",
    "string " * 40,  # over-long: truncated to 77 tokens with the EOS kept
    "",
]


@pytest.mark.parametrize("pad", [None, "!"])
def test_tokenizer_matches_transformers(tmp_path, pad):
    write_tiny_clip_vocab(tmp_path / "tok")
    kwargs = {} if pad is None else {"pad_token": pad}
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tok", **kwargs)
    ref.save_pretrained(tmp_path / "saved")
    for directory in (tmp_path / "saved", _slow_files_only(tmp_path)):
        ours = CLIPTokenizer.from_dir(directory)
        want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(ours(PROMPTS), want)
    assert ours(PROMPTS).shape == (len(PROMPTS), 77)


def _slow_files_only(tmp_path):
    """The same tokenizer as SD pipelines ship it: vocab.json + merges.txt (+ configs), no tokenizer.json."""
    import shutil

    slow = tmp_path / "slow"
    shutil.copytree(tmp_path / "saved", slow)
    (slow / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        if not (slow / name).exists():
            shutil.copy(tmp_path / "tok" / name, slow / name)
    return slow


def test_tokenizer_missing_files(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path / "tok")
