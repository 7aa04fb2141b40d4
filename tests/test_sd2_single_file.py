"""Single-file SD 2.x checkpoints in the original LDM layout: the UNet and VAE as for SD 1.x, the
text encoder OpenCLIP-H in open_clip's layout (``cond_stage_model.model.*``: fused attention
``in_proj``, ``text_projection`` stored ``[in, out]``, ``positional_embedding``, ``ln_final``,
``resblocks``), converted with a diffusers pipeline directory's configs.

The file's text encoder is a tiny open_clip text tower written in the test from open_clip's
module structure (``test_ldm_single_file.OpenCLIPText``): 24 blocks, as OpenCLIP-H, of which
SD 2.x reads 23 (the penultimate block's output, then ``ln_final``), so the diffusers config
says 23, as ``stabilityai/stable-diffusion-2``'s does. The pipeline directory's text encoder
is what diffusers' ``from_single_file`` makes of the file. The conversion is compared key for
key and tensor for tensor with diffusers' converters and ``from_single_file(config=...)``, and
the converted encoder's outputs with the open_clip tower's and transformers' ``CLIPTextModel``'s.
"""

from __future__ import annotations

import json
import re
import shutil

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import CLIP, UNETS, VAES, randomize, with_text_model, write_tiny_clip_vocab
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file, save_file
from test_ldm_single_file import (
    COMPONENTS,
    NON_WEIGHTS,
    _assert_same,
    _bad_file,
    _fails,
    ldm_state_dict,
    leaves,
    open_clip_tower,
    prompt_ids,
)

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.converters import plan
from streamflow_jax.converters.ldm import ldm_pipeline_sources

# OpenCLIP-H-like: GELU, an MLP 4x wide, 24 blocks in the file and 23 in the config
OPEN_CLIP_H = dict(CLIP, intermediate_size=128, num_hidden_layers=23, hidden_act="gelu")
PREFIX = "cond_stage_model.model."


def make_sd2(root):
    """(pipeline directory, LDM file, its state dict, the open_clip tower in the file)."""
    pipe = root / "pipe"
    randomize(diffusers.UNet2DConditionModel(**dict(UNETS["sd2"], cross_attention_dim=CLIP["hidden_size"])),
              1, std=0.1).save_pretrained(pipe / "unet")
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 2, std=0.1).save_pretrained(pipe / "vae")
    write_tiny_clip_vocab(pipe / "tokenizer")
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False, steps_offset=1)
    scheduler.save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))
    tower = open_clip_tower(OPEN_CLIP_H, 24, seed=3)
    sd = ldm_state_dict(pipe, {"unet": COMPONENTS["unet"], "vae": COMPONENTS["vae"]})
    sd.update({PREFIX + k: v.contiguous() for k, v in tower.state_dict().items()})
    sd.update({k: v for k, v in NON_WEIGHTS.items() if not k.startswith("cond_stage_model.")})
    save_file(sd, root / "sd2.safetensors")
    # the pipeline's text encoder: what diffusers' own single-file loader makes of the file
    (pipe / "text_encoder").mkdir()
    transformers.CLIPTextConfig(**OPEN_CLIP_H).save_pretrained(pipe / "text_encoder")
    loaded = diffusers.StableDiffusionPipeline.from_single_file(str(root / "sd2.safetensors"), config=str(pipe),
                                                                local_files_only=True)
    loaded.text_encoder.save_pretrained(pipe / "text_encoder")
    return pipe, root / "sd2.safetensors", sd, tower, loaded


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return make_sd2(tmp_path_factory.mktemp("sd2"))


# ---------------------------------------------------------------------------------------------
# against diffusers' own single-file conversion
# ---------------------------------------------------------------------------------------------


def test_matches_diffusers_single_file(sd2):
    pipe, file, sd, _, loaded = sd2
    sources = ldm_pipeline_sources(file, pipe)
    assert list(sources) == ["unet", "vae", "text_encoder"]
    unet_cfg, vae_cfg = (json.loads((pipe / n / "config.json").read_text()) for n in ("unet", "vae"))
    _assert_same(sources["unet"][1], convert_ldm_unet_checkpoint(sd, unet_cfg), "unet")
    _assert_same(sources["vae"][1], convert_ldm_vae_checkpoint(sd, vae_cfg), "vae")
    text_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**OPEN_CLIP_H))
    _assert_same(sources["text_encoder"][1], convert_open_clip_checkpoint(text_model, sd, prefix=PREFIX),
                 "text_encoder")
    # from_single_file(config=...): the whole pipeline, each component's parameters
    _assert_same(sources["unet"][1], loaded.unet.state_dict(), "from_single_file unet")
    _assert_same(sources["vae"][1], loaded.vae.state_dict(), "from_single_file vae")
    _assert_same(sources["text_encoder"][1], with_text_model(loaded.text_encoder.state_dict()),
                 "from_single_file text_encoder")
    # the file's last block, its projection and logit_scale are not read; the fused q/k/v are split
    text = sources["text_encoder"][1]
    assert not any(".layers.23." in k or k.startswith("text_projection") for k in text.keys())
    assert text.shape("text_model.encoder.layers.22.self_attn.v_proj.weight") == (32, 32)
    raw, _ = sources["text_encoder"]
    assert len(plan(raw, text).targets) == len(text.keys())


def test_text_encoder_matches_open_clip_and_transformers(sd2):
    """SD 2.x's encoding (the penultimate block, then ``ln_final``) from the converted
    ``CLIPTextModel`` equals the open_clip tower's and transformers' on the same weights."""
    pipe, file, _, tower, loaded = sd2
    raw, source = ldm_pipeline_sources(file, pipe)["text_encoder"]
    ours = plan(raw, source).model(progress=False).module
    ids = prompt_ids(3, CLIP["vocab_size"], CLIP["eos_token_id"])
    got = np.asarray(ours(ids)["last_hidden_state"])
    ref = tower(ids)["sd2"]
    with torch.no_grad():
        hf = loaded.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
    scale = np.abs(ref).max()
    assert np.abs(hf - ref).max() <= 1e-5 * scale  # transformers on diffusers' conversion = open_clip's penultimate
    assert np.abs(got - ref).max() <= 1e-5 * scale, np.abs(got - ref).max() / scale
    assert np.abs(got - hf).max() <= 1e-5 * scale, np.abs(got - hf).max() / scale


# ---------------------------------------------------------------------------------------------
# API and CLI: exactly the pipeline directory's parameters
# ---------------------------------------------------------------------------------------------


def test_converts_to_the_pipelines_parameters(sd2, tmp_path, capsys):
    pipe, file, _, _, _ = sd2
    shutil.copytree(pipe, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    sf.convert(file, tmp_path / "api", config=pipe, progress=False)
    assert cli(["convert", str(file), str(tmp_path / "cli"), "--config-from", str(tmp_path / "configs"), "-q"]) == 0
    assert "converted text_encoder (CLIPTextModel)" in capsys.readouterr().out
    for dst in (tmp_path / "api", tmp_path / "cli"):
        record = json.loads((dst / "conversion.json").read_text())
        assert record["converted"] == {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                                       "text_encoder": "CLIPTextModel"}
        assert sorted(record["copied"]) == ["scheduler", "tokenizer"]
        for name in COMPONENTS:
            want, got = leaves(sf.load(pipe, component=name)), leaves(sf.load(dst, component=name))
            assert got.keys() == want.keys(), name
            for k, v in got.items():
                np.testing.assert_array_equal(v, want[k], err_msg=f"{name} {k}")


def test_delta_and_lora_on_a_single_file(sd2, tmp_path):
    """``--delta`` (to the UNet) and ``--lora`` on an SD 2.x file give what they give on the
    pipeline directory; the text encoder's LoRA lands on a projection split from ``in_proj``."""
    pipe, file, _, _, _ = sd2
    gen = torch.Generator().manual_seed(4)
    unet_sd = load_file(pipe / "unet" / COMPONENTS["unet"])
    (tmp_path / "delta").mkdir()
    shutil.copy(pipe / "unet" / "config.json", tmp_path / "delta")
    save_file({k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in unet_sd.items()},
              tmp_path / "delta" / "diffusion_pytorch_model.safetensors")
    lora = {}
    for module, (out, inp) in (("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", (64, 32)),
                               ("text_encoder.text_model.encoder.layers.5.self_attn.k_proj", (32, 32))):
        lora[f"{module}.lora_A.weight"] = torch.randn(2, inp, generator=gen)
        lora[f"{module}.lora_B.weight"] = torch.randn(out, 2, generator=gen)
    lora["lora_te_text_model_encoder_layers_7_mlp_fc1.lora_down.weight"] = torch.randn(2, 32, generator=gen)
    lora["lora_te_text_model_encoder_layers_7_mlp_fc1.lora_up.weight"] = torch.randn(128, 2, generator=gen)
    lora["lora_te_text_model_encoder_layers_7_mlp_fc1.alpha"] = torch.tensor(1.0)
    save_file(lora, tmp_path / "lora.safetensors")
    extra = ["--delta", str(tmp_path / "delta"), "--lora", f"{tmp_path / 'lora.safetensors'}:0.5", "-q"]
    assert cli(["convert", str(file), str(tmp_path / "file"), "--config-from", str(pipe), *extra]) == 0
    assert cli(["convert", str(pipe), str(tmp_path / "dir"), *extra]) == 0
    for name in COMPONENTS:
        want = leaves(sf.load(tmp_path / "dir", component=name))
        got = leaves(sf.load(tmp_path / "file", component=name))
        base = leaves(sf.load(pipe, component=name))
        changed = {k for k in want if not np.array_equal(want[k], base[k])}
        assert got.keys() == want.keys() and bool(changed) == (name != "vae"), name
        if name == "text_encoder":
            assert changed == {"text_model.encoder.layers.5.self_attn.k_proj.kernel",
                               "text_model.encoder.layers.7.mlp.fc1.kernel"}, changed
        for k, v in got.items():
            np.testing.assert_array_equal(v, want[k], err_msg=f"{name} {k}")


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the key, nothing written
# ---------------------------------------------------------------------------------------------


def test_bad_files(sd2, tmp_path, capsys):
    pipe, _, sd, _, _ = sd2
    (tmp_path / "outs").mkdir()
    dst = tmp_path / "outs" / "out"
    # a block past the one SD 2.x leaves out
    extra = PREFIX + "transformer.resblocks.24.ln_1.weight"
    _fails(_bad_file(tmp_path, sd, "extra.safetensors", **{extra: torch.zeros(32)}), pipe, dst,
           rf"unexpected tensor\(s\) {re.escape(repr(extra))}", capsys)
    # an open_clip name no map knows
    odd = PREFIX + "transformer.resblocks.0.attn.in_proj_scale"
    _fails(_bad_file(tmp_path, sd, "odd.safetensors", **{odd: torch.zeros(96)}), pipe, dst,
           rf"unexpected tensor\(s\) {re.escape(repr(odd))}", capsys)
    # a fused projection missing: its three parts are
    _fails(_bad_file(tmp_path, sd, "missing.safetensors", drop={PREFIX + "transformer.resblocks.3.attn.in_proj_bias"}),
           pipe, dst, r"missing tensor\(s\) 'text_model\.encoder\.layers\.3\.self_attn\.k_proj\.bias', "
                      r"'text_model\.encoder\.layers\.3\.self_attn\.q_proj\.bias', "
                      r"'text_model\.encoder\.layers\.3\.self_attn\.v_proj\.bias'", capsys)
    # a mis-shaped one (rows that do not split in three), and a mis-shaped embedding
    _fails(_bad_file(tmp_path, sd, "rows.safetensors", **{PREFIX + "transformer.resblocks.0.attn.in_proj_weight":
                                                          torch.zeros(95, 32)}),
           pipe, dst, r"unexpected tensor\(s\) 'cond_stage_model\.model\.transformer\.resblocks\.0\.attn\."
                      r"in_proj_weight'", capsys)
    _fails(_bad_file(tmp_path, sd, "shape.safetensors", **{PREFIX + "positional_embedding": torch.zeros(76, 32)}),
           pipe, dst, r"tensor 'text_model\.embeddings\.position_embedding\.weight': shape \(76, 32\) does not fit",
           capsys)
