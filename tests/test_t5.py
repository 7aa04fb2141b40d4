"""The T5 v1.1 encoder against transformers' ``T5EncoderModel``, and the T5 tokenizer against
transformers' ``T5TokenizerFast``; tiny random models and a hand-written vocabulary, no network."""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest
import torch
from conftest import randomize, write_tiny_t5_tokenizer

transformers = pytest.importorskip("transformers")

import streamflow_jax as sf  # noqa: E402
from streamflow_jax.cli import main as cli  # noqa: E402
from streamflow_jax.models.t5 import relative_position_bucket  # noqa: E402
from streamflow_jax.tokenizer import T5Tokenizer  # noqa: E402

# Two tiny T5 v1.1 encoders. A: few buckets and a short max distance, so the 24-token ids reach
# the capped buckets; attention width 5*8 = 40 != d_model. B: the real bucket numbers (32, 128).
T5_A = dict(vocab_size=90, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=5, relative_attention_num_buckets=8,
            relative_attention_max_distance=16)
T5_B = dict(vocab_size=90, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, layer_norm_epsilon=1e-5)

encode = jax.jit(lambda model, ids: model.module(ids)["last_hidden_state"])  # FlowModel is a pytree


def make_t5(path, cfg: dict, seed: int = 0, **save_kwargs):
    """A random ``T5EncoderModel`` (every weight N(0, 0.2): init leaves norm weights at 1),
    saved with ``save_pretrained``."""
    config = transformers.T5Config(**cfg, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    model = randomize(transformers.T5EncoderModel(config), seed).eval()
    model.save_pretrained(path, **save_kwargs)
    return model


def padded_ids(length: int, seed: int = 0) -> np.ndarray:
    """``[2, length]`` ids as the tokenizer gives them: tokens, ``</s>`` (1), then pad (0) in row 0."""
    ids = np.random.default_rng(seed).integers(3, 90, (2, length))
    ids[0, 9], ids[0, 10:] = 1, 0
    ids[1, -1] = 1
    return ids


def reference(ref, ids, **kwargs):
    """transformers' forward as Flux/SD3 call it: no attention mask."""
    with torch.no_grad():
        return ref(torch.from_numpy(ids), **kwargs)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,length", [(T5_A, 24), (T5_B, 40)], ids=["buckets8", "buckets32"])
def test_t5_encoder_matches_transformers(tmp_path, cfg, length):
    ref = make_t5(tmp_path / "src", cfg)
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "-q"]) == 0
    model = sf.load(tmp_path / "dst")
    assert (model.family.name, model.text_len) == ("t5", 512)
    ids = padded_ids(length)
    got = encode(model, ids)
    want = reference(ref, ids).last_hidden_state
    assert got.shape == (2, length, cfg["d_model"]) and got.dtype == np.float32
    # measured 3.4e-7 (A) and 2.1e-7 (B) on CPU; 1e-5 and not looser because exact GELU in
    # place of gelu_new's tanh approximation is only 4.6e-5 off
    assert rel_err(got, want) <= 1e-5


def test_t5_bfloat16_is_finite_and_close(tmp_path):
    ref = make_t5(tmp_path / "src", T5_A)
    ids = padded_ids(24)
    got = encode(sf.load(tmp_path / "src", dtype="bfloat16"), ids)
    assert got.dtype == jax.numpy.bfloat16 and np.isfinite(np.asarray(got, np.float32)).all()
    # measured 1.0e-2 against the fp32 reference; transformers' own bf16 run is 1.1e-2 off
    assert rel_err(got, reference(ref, ids).last_hidden_state) <= 3e-2


def test_t5_float16_runs_the_residual_stream_in_float32(tmp_path):
    """Block 0's feed-forward is scaled so that the residual stream reaches millions, far past
    float16's 65504 (as T5-XXL's does): float16 weights must still give a finite output."""
    ref = randomize(transformers.T5EncoderModel(transformers.T5Config(**T5_A, feed_forward_proj="gated-gelu")), 0)
    ff = ref.eval().encoder.block[0].layer[1].DenseReluDense
    with torch.no_grad():  # activations grow, weights stay well inside float16's range
        ff.wi_0.weight.mul_(30)
        ff.wi_1.weight.mul_(30)
        ff.wo.weight.mul_(1e4)
    ref.save_pretrained(tmp_path / "src")
    ids = padded_ids(24)
    want = reference(ref, ids, output_hidden_states=True)
    assert float(want.hidden_states[1].abs().max()) > 10 * float(np.finfo(np.float16).max)  # a float16 stream is inf
    got = encode(sf.load(tmp_path / "src", dtype="float16"), ids)
    assert got.dtype == np.float16 and np.isfinite(np.asarray(got)).all()
    # measured 1.3e-3 (transformers in float16, wo kept in float32: 2.0e-3)
    assert rel_err(got, want.last_hidden_state) <= 1e-2


def test_t5_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-700, 701)
    for buckets, distance in [(32, 128), (8, 16), (32, 64), (64, 256), (33, 100), (4, 8)]:
        want = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=True,
                                                     num_buckets=buckets, max_distance=distance)
        np.testing.assert_array_equal(relative_position_bucket(rel, buckets, distance), want.numpy(),
                                      err_msg=f"buckets {buckets}, max distance {distance}")


def test_t5_sharded_checkpoint_converts_to_the_same_model(tmp_path):
    ref = make_t5(tmp_path / "src", T5_A, max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) > 1
    ids = padded_ids(24)
    assert rel_err(encode(sf.load(tmp_path / "src"), ids), reference(ref, ids).last_hidden_state) <= 1e-5


def test_t5_tied_embedding_in_any_form(tmp_path):
    """transformers 5 writes only ``shared.weight``; files holding ``encoder.embed_tokens.weight``
    instead, or both (older writers), give the same model."""
    from safetensors.numpy import load_file, save_file

    ref = make_t5(tmp_path / "src", T5_A)
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    assert "shared.weight" in tensors and "encoder.embed_tokens.weight" not in tensors
    shared = ref.shared.weight.detach().numpy()
    forms = {"embed_tokens_only": {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                                   for k, v in tensors.items()},
             "both": {**tensors, "encoder.embed_tokens.weight": tensors["shared.weight"].copy()}}
    for name, form in forms.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
        save_file(form, tmp_path / name / "model.safetensors")
        np.testing.assert_array_equal(np.asarray(sf.load(tmp_path / name).module.shared.weight[...]), shared,
                                      err_msg=name)


def _convert_fails(tmp_path, capsys, message: str):
    dst = tmp_path / "dst"
    capsys.readouterr()  # drop what came before (transformers' progress bars)
    assert cli(["convert", str(tmp_path / "src"), str(dst), "-q"]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not dst.exists()  # nothing written


def test_t5_config_fields_strict(tmp_path, capsys):
    make_t5(tmp_path / "src", T5_A)
    path = tmp_path / "src" / "config.json"
    raw = json.loads(path.read_text())
    # the XXL hub config's extra keys and generation settings do not change the encoder
    path.write_text(json.dumps({**raw, "is_encoder_decoder": True, "output_past": True, "n_positions": 512,
                                "torch_dtype": "float16", "num_beams": 4}))
    assert sf.load(tmp_path / "src").config.num_heads == 5
    derived = ("feed_forward_proj", "dense_act_fn", "is_gated_act")
    cases = [
        ("unsupported: feed_forward_proj='relu'", {**raw, "feed_forward_proj": "relu", "dense_act_fn": "relu",
                                                   "is_gated_act": False}),
        # without the field transformers' default applies: "relu", T5 v1.0
        ("unsupported: feed_forward_proj='relu'", {k: v for k, v in raw.items() if k not in derived}),
        ("unsupported: dense_act_fn='gelu'", {**raw, "dense_act_fn": "gelu"}),  # an explicit value wins
        ("unsupported: is_decoder=True", {**raw, "is_decoder": True}),
        ("unknown config field 'use_rope'", {**raw, "use_rope": True}),
    ]
    for message, config in cases:
        path.write_text(json.dumps(config))
        _convert_fails(tmp_path, capsys, message)


def test_t5_missing_and_unexpected_tensors(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    make_t5(tmp_path / "src", T5_A)
    file = tmp_path / "src" / "model.safetensors"
    tensors = load_file(file)
    missing = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    save_file({k: v for k, v in tensors.items() if k != missing}, file)
    _convert_fails(tmp_path, capsys, f"missing tensor(s) '{missing.replace('weight', 'kernel')}'")
    # only block 0 has a relative-attention table
    extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    save_file({**tensors, extra: np.zeros((8, 5), np.float32)}, file)
    _convert_fails(tmp_path, capsys, f"unexpected tensor(s) '{extra}'")


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------





T5_PROMPTS = [
    "a photo of the cats",
    "Hello, world!!! (test) -- ok? it's 42; \"quoted\": yes",
    "café crème — 東京 🚀 naïve",  # unknown characters: <unk>, and fused runs of them
    "",
    "   lead  multi   sp\tta\nnl  ",
    "<pad> </s> a dog",  # special tokens typed in the text are matched whole
    "A Photo OF The DOG on a Mat",
    "a photo of a cat on the world " * 12,  # over-long at both lengths
]


def _v4_style(src, dst):
    """The same vocabulary as older converters wrote it: whitespace normalizers and a bare
    Metaspace, which transformers 5 replaces (and so must we)."""
    import shutil

    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Strip", "strip_left": False, "strip_right": True},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"}]}
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (dst / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return dst


@pytest.mark.parametrize("length", [16, 64])
def test_t5_tokenizer_matches_transformers(tmp_path, length):
    from tokenizers import Tokenizer

    saved = write_tiny_t5_tokenizer(tmp_path / "tok")
    for directory in (saved, _v4_style(saved, tmp_path / "v4")):
        ref = transformers.T5TokenizerFast.from_pretrained(directory)
        want = ref(T5_PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
        with pytest.warns(UserWarning, match=f"limit of {length} tokens"):
            got = T5Tokenizer.from_dir(directory, max_length=length)(T5_PROMPTS)
        assert got.dtype == np.int32 and got.shape == (len(T5_PROMPTS), length)
        np.testing.assert_array_equal(got, want, err_msg=str(directory))
    assert got[3, 0] == 1 and not got[3, 1:].any()  # empty prompt: </s> then padding
    assert got[-1, -1] == 1  # over-long: truncated, still ending in </s>
    # the v4-style file read as is would differ on whitespace: the rebuild is what matches
    plain = Tokenizer.from_file(str(tmp_path / "v4" / "tokenizer.json"))
    assert plain.encode(T5_PROMPTS[4]).ids != [i for i in got[4] if i]


def test_t5_tokenizer_max_length_and_warning(tmp_path):
    tok = T5Tokenizer.from_dir(write_tiny_t5_tokenizer(tmp_path / "tok", model_max_length=256))
    assert tok.max_length == 256  # from tokenizer_config.json
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fitting prompts do not warn
        assert tok(["a photo of a cat", "x " * 254]).shape == (2, 256)  # 254 tokens + </s>: not truncated
    # named by text, not by index (the batch may be the pipeline's: negative prompts, a stream's tick)
    with pytest.warns(UserWarning, match=r"prompt\(s\) 'x x x x x x x x x x x x x x x x x x x\.\.\.' longer than the "
                                         r"T5 limit of 256 tokens"):
        tok(["a cat", "x " * 256])
    unset = T5Tokenizer.from_dir(write_tiny_t5_tokenizer(tmp_path / "unset", model_max_length=int(1e30)))
    assert unset.max_length == 512  # transformers' "unset" -> T5's length


def test_t5_tokenizer_missing_files(tmp_path):
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: missing.*only spiece\.model.*sentencepiece"):
        T5Tokenizer.from_dir(tmp_path / "slow")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: missing"):
        T5Tokenizer.from_dir(tmp_path / "empty")
