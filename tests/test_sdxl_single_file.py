"""Single-file SDXL checkpoints in SGM's layout (``sd_xl_base_1.0.safetensors`` and the models
built on it): the UNet under ``model.diffusion_model.*`` (LDM's block numbering, SDXL's added
text_time embedding as ``label_emb.0``, several transformer layers per block), the VAE under
``first_stage_model.*``, CLIP-L under ``conditioner.embedders.0.transformer.*`` (transformers'
keys) and OpenCLIP bigG under ``conditioner.embedders.1.model.*`` (open_clip's layout: fused
``in_proj``, ``text_projection`` stored ``[in, out]``), converted with a diffusers
``StableDiffusionXLPipeline`` directory's configs.

The UNet, VAE and CLIP-L are written into the file from a tiny random diffusers pipeline with
the inverse maps of ``test_ldm_single_file``; bigG is a tiny open_clip text tower written from
open_clip's module structure (``test_ldm_single_file.OpenCLIPText``), and the pipeline
directory's ``text_encoder_2`` is what diffusers' ``from_single_file`` makes of it. The
conversion is compared key for key and tensor for tensor with diffusers' converters and
``from_single_file(config=...)``; the converted bigG's penultimate states and pooled projection
with the open_clip tower's and transformers' ``CLIPTextModelWithProjection``'s.
"""

from __future__ import annotations

import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import CLIP, VAES, randomize, with_text_model, write_tiny_clip_vocab
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file, save_file
from test_ldm_single_file import (
    COMPONENTS,
    _assert_same,
    _bad_file,
    _fails,
    ldm_clip_key,
    ldm_state_dict,
    leaves,
    open_clip_tower,
    prompt_ids,
)

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.converters import plan
from streamflow_jax.converters.ldm import ldm_pipeline_sources

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."
# bigG-like: GELU, MLP 4x wide, a projection (its pooled output is the UNet's text_embeds)
OPEN_CLIP_G = dict(CLIP, hidden_size=48, intermediate_size=192, num_attention_heads=6, num_hidden_layers=4,
                   projection_dim=24, hidden_act="gelu", architectures=["CLIPTextModelWithProjection"])
# SDXL base's shape: no attention on the first level, 2 transformer layers per block below it,
# linear projections, text states 32 + 48 wide, the added embedding of the pooled text (24)
# and six time ids (6 x 8)
SDXL_TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                 norm_num_groups=8, cross_attention_dim=80, attention_head_dim=(2, 4, 4),
                 transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=72)
SDXL_COMPONENTS = {**COMPONENTS, "text_encoder_2": "model.safetensors"}
BUFFERS = {  # what SGM files carry beside the weights
    CLIP_L_PREFIX + "text_model.embeddings.position_ids": torch.arange(77)[None],
    "denoiser.sigmas": torch.linspace(0.03, 14.6, 1000),
}


def make_sdxl(root):
    """(pipeline directory, SGM file, its state dict, the open_clip tower in the file, diffusers'
    ``from_single_file`` pipeline)."""
    pipe = root / "pipe"
    randomize(diffusers.UNet2DConditionModel(**SDXL_TINY), 1, std=0.1).save_pretrained(pipe / "unet")
    randomize(diffusers.AutoencoderKL(**VAES["sd"], scaling_factor=0.13025), 2, std=0.1).save_pretrained(pipe / "vae")
    randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 3).save_pretrained(pipe / "text_encoder")
    for name in ("tokenizer", "tokenizer_2"):
        write_tiny_clip_vocab(pipe / name)
    diffusers.EulerDiscreteScheduler(steps_offset=1).save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "feature_extractor": [None, None], "image_encoder": [None, None]}))
    tower = open_clip_tower(OPEN_CLIP_G, OPEN_CLIP_G["num_hidden_layers"], seed=4)
    sd = ldm_state_dict(pipe, {"unet": COMPONENTS["unet"], "vae": COMPONENTS["vae"]})
    assert "model.diffusion_model.label_emb.0.2.weight" in sd
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in sd
    clip_l = load_file(pipe / "text_encoder" / "model.safetensors")
    sd.update({ldm_clip_key(k, CLIP_L_PREFIX): v for k, v in clip_l.items()})
    sd.update({BIGG_PREFIX + k: v.contiguous() for k, v in tower.state_dict().items()})
    sd.update(BUFFERS)
    save_file(sd, root / "sdxl.safetensors")
    (pipe / "text_encoder_2").mkdir()  # its config; diffusers' own single-file loader fills the weights
    transformers.CLIPTextConfig(**OPEN_CLIP_G).save_pretrained(pipe / "text_encoder_2")
    loaded = diffusers.StableDiffusionXLPipeline.from_single_file(str(root / "sdxl.safetensors"), config=str(pipe),
                                                                  local_files_only=True)
    loaded.text_encoder_2.save_pretrained(pipe / "text_encoder_2")
    return pipe, root / "sdxl.safetensors", sd, tower, loaded


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return make_sdxl(tmp_path_factory.mktemp("sdxl"))


# ---------------------------------------------------------------------------------------------
# against diffusers' own single-file conversion
# ---------------------------------------------------------------------------------------------


def test_matches_diffusers_single_file(sdxl):
    pipe, file, sd, _, loaded = sdxl
    sources = ldm_pipeline_sources(file, pipe)
    assert list(sources) == ["unet", "vae", "text_encoder", "text_encoder_2"]
    unet_cfg, vae_cfg = (json.loads((pipe / n / "config.json").read_text()) for n in ("unet", "vae"))
    _assert_same(sources["unet"][1], convert_ldm_unet_checkpoint(sd, unet_cfg), "unet")
    _assert_same(sources["vae"][1], convert_ldm_vae_checkpoint(sd, vae_cfg), "vae")
    clip_l = convert_ldm_clip_checkpoint(sd)  # diffusers keeps the position_ids buffer; we drop it
    assert clip_l.pop("text_model.embeddings.position_ids").shape == (1, 77)
    _assert_same(sources["text_encoder"][1], clip_l, "text_encoder")
    big_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**OPEN_CLIP_G))
    _assert_same(sources["text_encoder_2"][1], convert_open_clip_checkpoint(big_g, sd, prefix=BIGG_PREFIX),
                 "text_encoder_2")
    # from_single_file(config=...): the whole pipeline, each component's parameters
    _assert_same(sources["unet"][1], loaded.unet.state_dict(), "from_single_file unet")
    _assert_same(sources["vae"][1], loaded.vae.state_dict(), "from_single_file vae")
    for name in ("text_encoder", "text_encoder_2"):
        _assert_same(sources[name][1], with_text_model(getattr(loaded, name).state_dict()), f"from_single_file {name}")
    big_g = sources["text_encoder_2"][1]
    assert big_g.shape("text_projection.weight") == (24, 48)  # [P, D]; the file's is [D, P]
    assert {k for k in big_g.keys() if ".layers.3." in k}  # every block read (SDXL pools the last one)
    for name in ("text_encoder", "text_encoder_2"):
        raw, source = sources[name]
        assert len(plan(raw, source).targets) == len(source.keys()), name


def test_refiner_big_g(sdxl, tmp_path):
    """The SDXL refiner's only text encoder, bigG as ``conditioner.embedders.0.model.*``, is its
    ``text_encoder_2``."""
    pipe, _, sd, _, _ = sdxl
    prefix = "conditioner.embedders.0.model."
    refiner = {k: v for k, v in sd.items() if not k.startswith("conditioner.")}
    refiner.update({prefix + k[len(BIGG_PREFIX):]: v for k, v in sd.items() if k.startswith(BIGG_PREFIX)})
    save_file(refiner, tmp_path / "refiner.safetensors")
    sources = ldm_pipeline_sources(tmp_path / "refiner.safetensors", pipe)
    assert list(sources) == ["unet", "vae", "text_encoder_2"]
    big_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**OPEN_CLIP_G))
    _assert_same(sources["text_encoder_2"][1], convert_open_clip_checkpoint(big_g, refiner, prefix=prefix),
                 "refiner text_encoder_2")


def test_big_g_matches_open_clip_and_transformers(sdxl):
    """SDXL's use of bigG: the penultimate block's output (no ``ln_final``) and the pooled,
    projected EOT state, from the converted ``CLIPTextModelWithProjection``, equal the open_clip
    tower's and transformers' on the same weights."""
    pipe, file, _, tower, loaded = sdxl
    raw, source = ldm_pipeline_sources(file, pipe)["text_encoder_2"]
    ours = plan(raw, source).model(progress=False).module
    ids = prompt_ids(3, CLIP["vocab_size"], CLIP["eos_token_id"], seed=1)
    got = ours(ids)
    ref = tower(ids)
    with torch.no_grad():
        hf = loaded.text_encoder_2(torch.from_numpy(ids), output_hidden_states=True)
    pairs = {"penultimate": (np.asarray(got["hidden_states"][-2]), ref["hidden_states"][-2],
                             hf.hidden_states[-2].numpy()),
             "text_embeds": (np.asarray(got["text_embeds"]), ref["text_embeds"], hf.text_embeds.numpy())}
    for name, (ours_, open_clip_, hf_) in pairs.items():
        scale = np.abs(open_clip_).max()
        assert np.abs(hf_ - open_clip_).max() <= 1e-5 * scale, name
        assert np.abs(ours_ - open_clip_).max() <= 1e-5 * scale, (name, np.abs(ours_ - open_clip_).max() / scale)
        assert np.abs(ours_ - hf_).max() <= 1e-5 * scale, (name, np.abs(ours_ - hf_).max() / scale)


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the key, nothing written
# ---------------------------------------------------------------------------------------------


def test_bad_text_encoders(sdxl, tmp_path):
    """Caught while the file is mapped, or when its text encoders are planned."""
    pipe, file, sd, _, _ = sdxl
    # an SD 1.x text encoder beside SDXL's: two encoders for one text_encoder
    mixed = _bad_file(tmp_path, sd, "mixed.safetensors",
                      **{"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(32)})
    with pytest.raises(sf.ConversionError, match=r"both cond_stage_model\.transformer\.\* and "
                                                 r"conditioner\.embedders\.0\.transformer\.\* tensors"):
        ldm_pipeline_sources(mixed, pipe)
    # a pipeline directory whose text_encoder_2 is another model (SD3's T5, say)
    shutil.copytree(pipe, tmp_path / "t5", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "t5" / "text_encoder_2" / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"]}))
    with pytest.raises(sf.ConversionError, match=r"text_encoder_2 is a T5EncoderModel; an LDM file's conditioner\."
                                                 r"embedders\.1\.model\.\* tensors are a CLIPTextModel or"):
        ldm_pipeline_sources(file, tmp_path / "t5")
    # a block bigG's config does not have, a projection of the wrong shape
    for extra, match in (({BIGG_PREFIX + "transformer.resblocks.4.mlp.c_fc.bias": torch.zeros(192)},
                          r"unexpected tensor\(s\) 'conditioner\.embedders\.1\.model\.transformer\.resblocks\.4\."),
                         ({BIGG_PREFIX + "text_projection": torch.zeros(24, 48)},
                          r"tensor 'text_projection\.weight': shape \(24, 48\) does not fit the model's \(48, 24\)")):
        raw, source = ldm_pipeline_sources(_bad_file(tmp_path, sd, "bad.safetensors", **extra), pipe)["text_encoder_2"]
        with pytest.raises(sf.ConversionError, match=match):
            plan(raw, source)


# ---------------------------------------------------------------------------------------------
# the whole file: API and CLI, delta and LoRA, refusals
# ---------------------------------------------------------------------------------------------


def test_converts_to_the_pipelines_parameters(sdxl, tmp_path, capsys):
    pipe, file, _, _, _ = sdxl
    shutil.copytree(pipe, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    sf.convert(file, tmp_path / "api", config=pipe, progress=False)
    assert cli(["convert", str(file), str(tmp_path / "cli"), "--config-from", str(tmp_path / "configs"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "converted text_encoder_2 (CLIPTextModelWithProjection)" in out, out
    for dst in (tmp_path / "api", tmp_path / "cli"):
        record = json.loads((dst / "conversion.json").read_text())
        assert record["converted"] == {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                                       "text_encoder": "CLIPTextModel",
                                       "text_encoder_2": "CLIPTextModelWithProjection"}
        assert sorted(record["copied"]) == ["scheduler", "tokenizer", "tokenizer_2"]
        for name in SDXL_COMPONENTS:
            want, got = leaves(sf.load(pipe, component=name)), leaves(sf.load(dst, component=name))
            assert got.keys() == want.keys(), name
            for k, v in got.items():
                np.testing.assert_array_equal(v, want[k], err_msg=f"{name} {k}")


def test_generates_the_same_latents(sdxl, tmp_path):
    """The converted file is a working PeRFlow-SDXL pipeline (tokenizers, scheduler and
    model_index.json taken from the configs' directory): the latents of the directory it was
    written from."""
    pipe, file, _, _, _ = sdxl
    sf.convert(file, tmp_path / "out", config=pipe, progress=False)
    noise = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    opts = dict(prediction_type="ddim_eps", num_time_windows=4)
    want = sf.Pipeline.from_diffusers(pipe, **opts)("a cat", noise=noise, steps=2, output_type="latent")
    got = sf.Pipeline.from_diffusers(tmp_path / "out", **opts)("a cat", noise=noise, steps=2, output_type="latent")
    assert np.all(np.isfinite(got)) and np.any(got != noise)
    np.testing.assert_array_equal(got, want)


def test_delta_and_lora_on_a_single_file(sdxl, tmp_path):
    """``--delta`` (to the UNet) and ``--lora`` (diffusers names for the UNet, kohya's
    ``lora_te1_``/``lora_te2_`` for the text encoders) on an SDXL file give what they give on
    the pipeline directory."""
    pipe, file, _, _, _ = sdxl
    gen = torch.Generator().manual_seed(5)
    unet_sd = load_file(pipe / "unet" / COMPONENTS["unet"])
    (tmp_path / "delta").mkdir()
    shutil.copy(pipe / "unet" / "config.json", tmp_path / "delta")
    save_file({k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in unet_sd.items()},
              tmp_path / "delta" / "diffusion_pytorch_model.safetensors")
    lora = {}
    for module, (out, inp) in (("unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_v", (64, 80)),
                               ("unet.add_embedding.linear_1", (32 * 4, 72))):
        lora[f"{module}.lora_A.weight"] = torch.randn(2, inp, generator=gen)
        lora[f"{module}.lora_B.weight"] = torch.randn(out, 2, generator=gen)
    for module, (out, inp) in (("lora_te1_text_model_encoder_layers_1_self_attn_q_proj", (32, 32)),
                               ("lora_te2_text_model_encoder_layers_2_self_attn_v_proj", (48, 48))):
        lora[f"{module}.lora_down.weight"] = torch.randn(2, inp, generator=gen)
        lora[f"{module}.lora_up.weight"] = torch.randn(out, 2, generator=gen)
        lora[f"{module}.alpha"] = torch.tensor(2.0)
    save_file(lora, tmp_path / "lora.safetensors")
    extra = ["--delta", str(tmp_path / "delta"), "--lora", f"{tmp_path / 'lora.safetensors'}:0.5", "-q"]
    assert cli(["convert", str(file), str(tmp_path / "file"), "--config-from", str(pipe), *extra]) == 0
    assert cli(["convert", str(pipe), str(tmp_path / "dir"), *extra]) == 0
    for name in SDXL_COMPONENTS:
        want = leaves(sf.load(tmp_path / "dir", component=name))
        got = leaves(sf.load(tmp_path / "file", component=name))
        base = leaves(sf.load(pipe, component=name))
        changed = {k for k in want if not np.array_equal(want[k], base[k])}
        assert got.keys() == want.keys() and bool(changed) == (name != "vae"), name
        if name == "text_encoder_2":
            assert changed == {"text_model.encoder.layers.2.self_attn.v_proj.kernel"}, changed
        for k, v in got.items():
            np.testing.assert_array_equal(v, want[k], err_msg=f"{name} {k}")


def test_bad_files(sdxl, tmp_path, capsys):
    pipe, _, sd, _, _ = sdxl
    (tmp_path / "outs").mkdir()
    dst = tmp_path / "outs" / "out"
    # the added embedding missing: named as the UNet parameter it would fill
    _fails(_bad_file(tmp_path, sd, "missing.safetensors", drop={"model.diffusion_model.label_emb.0.0.weight"}),
           pipe, dst, r"missing tensor\(s\) 'add_embedding\.linear_1\.kernel'", capsys)
    # a third transformer layer where the config has two (the SpatialTransformer keeps diffusers' names)
    extra = {"model.diffusion_model.input_blocks.7.1.transformer_blocks.2.norm1.weight": torch.zeros(64)}
    _fails(_bad_file(tmp_path, sd, "extra.safetensors", **extra), pipe, dst,
           r"unexpected tensor\(s\) 'down_blocks\.2\.attentions\.0\.transformer_blocks\.2\.norm1\.weight'", capsys)
    # SD 1.x's label_emb-less UNet config for an SDXL file: label_emb is no name of that config
    shutil.copytree(pipe, tmp_path / "sd15unet", ignore=shutil.ignore_patterns("*.safetensors"))
    raw = json.loads((tmp_path / "sd15unet" / "unet" / "config.json").read_text())
    for k in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        raw.pop(k)
    (tmp_path / "sd15unet" / "unet" / "config.json").write_text(json.dumps(raw))
    _fails(_bad_file(tmp_path, sd, "same.safetensors"), tmp_path / "sd15unet", dst,
           r"unexpected tensor\(s\) 'model\.diffusion_model\.label_emb\.0\.0\.bias'", capsys)
    # a bigG block missing
    nobigg = {BIGG_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"}
    _fails(_bad_file(tmp_path, sd, "nobigg.safetensors", drop=nobigg),
           pipe, dst, r"missing tensor\(s\) 'text_model\.encoder\.layers\.1\.self_attn\.k_proj\.kernel'", capsys)
