"""Single-file SD 1.x checkpoints in the original LDM layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``), converted with a diffusers
pipeline directory's configs.

The LDM file is written here from a tiny random diffusers pipeline with an inverse key map
written from the published LDM names (``ldm/modules/diffusionmodules/openaimodel.py`` and
``model.py``), independently of ``streamflow_jax.models.sd_ldm``: the conversion must give back
exactly the pipeline's parameters, agree with diffusers' own converter, and generate the same
latents. The tiny UNet has an attention level and one without (down and up), a downsampler
and an upsampler; the VAE its mid attention (1x1 convs in LDM) and quant convs.

The helpers here (the inverse maps, an open_clip text tower written from open_clip's modules)
also write the SD 2.x and SDXL files of ``test_sd2_single_file`` and ``test_sdxl_single_file``.
"""

from __future__ import annotations

import collections
import json
import re
import shutil

import diffusers
import numpy as np
import pytest
import torch
from conftest import UNETS, make_perflow_pipeline, randomize
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from flax import nnx
from safetensors.torch import load_file, save_file

import streamflow_jax as sf
from streamflow_jax.cli import main as cli
from streamflow_jax.converters import plan
from streamflow_jax.converters.ldm import ldm_pipeline_sources
from streamflow_jax.models import flat_params

COMPONENTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
              "text_encoder": "model.safetensors"}

# ---------------------------------------------------------------------------------------------
# diffusers -> LDM, from the published names (the inverse of what is tested)
# ---------------------------------------------------------------------------------------------

# openaimodel.ResBlock: in_layers (GroupNorm, SiLU, conv), emb_layers (SiLU, linear),
# out_layers (GroupNorm, SiLU, Dropout, conv), skip_connection
UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            # SDXL's added text_time embedding: label_emb.0 = (linear, SiLU, linear)
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(table, rest):
    module, leaf = rest.rsplit(".", 1)
    return f"{table.get(module, module)}.{leaf}"


def ldm_unet_key(key: str, cfg: dict) -> str:
    """A diffusers UNet key -> ``model.diffusion_model.*``: LDM numbers its blocks flat,
    ``n + 1`` per down level (its resnets, then the downsampler as a block of its own) after
    ``input_blocks.0`` (conv_in), ``n + 1`` per up level."""
    n = cfg["layers_per_block"]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    module, leaf = key.rsplit(".", 1)
    if module in UNET_TOP:
        out = f"{UNET_TOP[module]}.{leaf}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * (n + 1) + j
        out = f"input_blocks.{i}.0.{_sub(UNET_RES, rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        out = f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        out = f"middle_block.{2 * int(m[1])}.{_sub(UNET_RES, m[2])}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        out = f"middle_block.1.{m[1]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * (n + 1) + j
        out = f"output_blocks.{i}.0.{_sub(UNET_RES, rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        out = f"output_blocks.{b * (n + 1) + n}.{2 if up_attn[b] else 1}.conv.{m[2]}"
    else:
        raise AssertionError(f"no LDM name for UNet key {key}")
    return "model.diffusion_model." + out


def ldm_vae_key(key: str, cfg: dict) -> str:
    """A diffusers VAE key -> ``first_stage_model.*``; the decoder's ``up.N`` is numbered by
    resolution (``up.0`` the highest), reversed against diffusers' ``up_blocks``."""
    levels = len(cfg["block_out_channels"])

    def res(rest):  # model.py's ResnetBlock keeps diffusers' names but for the shortcut
        return rest.replace("conv_shortcut", "nin_shortcut")

    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        out = f"encoder.down.{m[1]}.block.{m[2]}.{res(m[3])}"
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        out = f"encoder.down.{m[1]}.downsample.{m[2]}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        out = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{res(m[3])}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        out = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        out = f"{m[1]}.mid.block_{int(m[2]) + 1}.{res(m[3])}"
    elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        out = f"{m[1]}.mid.attn_1.{_sub(VAE_ATTN, m[2])}"
    else:
        out = key.replace("conv_norm_out", "norm_out")  # conv_in, conv_out, (post_)quant_conv
    return "first_stage_model." + out


def ldm_clip_key(key: str, prefix: str = "cond_stage_model.transformer.") -> str:
    """transformers 5 saves CLIPTextModel without ``text_model.``; SD 1.x files (and SDXL's
    ``conditioner.embedders.0.transformer.``) have it."""
    return prefix + (key if key.startswith("text_model.") else "text_model." + key)


NON_WEIGHTS = {  # what LDM files carry beside the weights
    "betas": torch.linspace(1e-4, 2e-2, 1000),
    "alphas_cumprod": torch.linspace(1, 0, 1000),
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(123, dtype=torch.int32),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    "scale_factor": torch.tensor(0.18215),
    "first_stage_model.loss.logvar": torch.zeros(()),  # LDM autoencoder training checkpoints carry their loss
    "first_stage_model.loss.perceptual_loss.net.slice1.0.weight": torch.zeros(64, 3, 3, 3),
}


def ldm_state_dict(pipe, components=COMPONENTS) -> dict[str, torch.Tensor]:
    """The pipeline's weights in one LDM-layout dict (the VAE's mid attention as 1x1 convs)."""
    out = {}
    for name in components:
        cfg = json.loads((pipe / name / "config.json").read_text())
        for key, t in load_file(pipe / name / COMPONENTS[name]).items():
            if name == "unet":
                out[ldm_unet_key(key, cfg)] = t
            elif name == "vae":
                new = ldm_vae_key(key, cfg)
                conv = re.search(r"attn_1\.(q|k|v|proj_out)\.weight", new)  # LDM: 1x1 convs
                out[new] = t[:, :, None, None].contiguous() if conv else t
            else:
                out[ldm_clip_key(key)] = t
    return out


# ---------------------------------------------------------------------------------------------
# open_clip's text tower (SD 2.x's OpenCLIP-H, SDXL's bigG), written from open_clip's model.py
# and transformer.py: its state dict has open_clip's names, its forward is the reference
# ---------------------------------------------------------------------------------------------


class OpenCLIPBlock(torch.nn.Module):
    """open_clip's ResidualAttentionBlock: pre-LayerNorm, ``nn.MultiheadAttention`` (fused
    ``in_proj``), an MLP named ``c_fc``/``c_proj`` with GELU (OpenCLIP-H and bigG)."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(collections.OrderedDict(
            c_fc=torch.nn.Linear(width, mlp), gelu=torch.nn.GELU(), c_proj=torch.nn.Linear(mlp, width)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(torch.nn.Module):
    """open_clip's text tower as SD 2.x's ``FrozenOpenCLIPEmbedder`` and SDXL's
    ``FrozenOpenCLIPEmbedder2`` keep it (``visual`` deleted)."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, mlp: int, embed_dim: int, ctx: int = 77):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.positional_embedding = torch.nn.Parameter(torch.empty(ctx, width))
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList(OpenCLIPBlock(width, heads, mlp) for _ in range(layers))
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.empty(width, embed_dim))  # x @ text_projection
        self.logit_scale = torch.nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu_(1), persistent=False)

    @torch.no_grad()
    def forward(self, ids):
        """Every block's output (embeddings first), ``ln_final`` of the last, the pooled
        projection (the EOT token is the highest id), and SD 2.x's encoding: ``ln_final`` of the
        penultimate block's output."""
        ids = torch.as_tensor(ids)
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        mask = self.attn_mask[: ids.shape[1], : ids.shape[1]]
        states = [x]
        for block in self.transformer.resblocks:
            x = block(x, mask)
            states.append(x)
        last = self.ln_final(x)
        pooled = last[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ self.text_projection
        return {"hidden_states": [h.numpy() for h in states], "last": last.numpy(), "text_embeds": pooled.numpy(),
                "sd2": self.ln_final(states[-2]).numpy()}


def open_clip_tower(cfg: dict, layers: int, seed: int) -> OpenCLIPText:
    """A random tower shaped as the transformers CLIP config ``cfg`` (``layers`` blocks)."""
    tower = OpenCLIPText(cfg["vocab_size"], cfg["hidden_size"], cfg["num_attention_heads"], layers,
                         cfg["intermediate_size"], cfg["projection_dim"], cfg.get("max_position_embeddings", 77))
    return randomize(tower, seed, std=0.2).eval()


def prompt_ids(batch: int, vocab: int, eos: int, seed: int = 0, length: int = 77) -> np.ndarray:
    """Token ids whose EOT (``eos``, the highest id) ends each row at a different position,
    padded with EOT as CLIP's tokenizer does."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, length), eos, np.int64)
    for b in range(batch):
        n = 3 + 4 * b
        ids[b, :n] = rng.integers(0, min(vocab, eos), n)
    return ids


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    """(pipeline directory, LDM file, its state dict)."""
    root = tmp_path_factory.mktemp("ldm")
    pipe = make_perflow_pipeline(root / "pipe")
    sd = ldm_state_dict(pipe)
    assert any(k.endswith("mid.attn_1.q.weight") and v.ndim == 4 for k, v in sd.items())
    sd.update(NON_WEIGHTS)
    # EMA copies of UNet weights, named as LDM names them (dots dropped), of other values: the
    # non-EMA weights are taken, as diffusers' converter does by default (README)
    gen = torch.Generator().manual_seed(9)
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.bias"):
        sd["model_ema." + key[len("model."):].replace(".", "")] = torch.randn(sd[key].shape, generator=gen)
    save_file(sd, root / "sd15.safetensors")
    return pipe, root / "sd15.safetensors", sd


def leaves(model) -> dict[str, np.ndarray]:
    flat, _, _ = flat_params(nnx.to_pure_dict(model.state))
    return {k: np.asarray(v) for k, v in flat.items()}


# ---------------------------------------------------------------------------------------------
# (a) API and CLI: exactly the pipeline directory's parameters
# ---------------------------------------------------------------------------------------------


def test_converts_to_the_pipelines_parameters(ldm, tmp_path, capsys):
    pipe, file, _ = ldm
    sf.convert(file, tmp_path / "api", config=pipe, progress=False)
    assert cli(["convert", str(file), str(tmp_path / "cli"), "--config-from", str(pipe), "-q"]) == 0
    out = capsys.readouterr().out
    for line in ("converted unet (UNet2DConditionModel)", "converted vae (AutoencoderKL)",
                 "converted text_encoder (CLIPTextModel)", "copied    scheduler", "copied    tokenizer"):
        assert line in out, out
    for dst in (tmp_path / "api", tmp_path / "cli"):
        record = json.loads((dst / "conversion.json").read_text())
        assert record["converted"] == {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                                       "text_encoder": "CLIPTextModel"}
        assert sorted(record["copied"]) == ["scheduler", "tokenizer"] and record["skipped"] == {}
        assert json.loads((dst / "model_index.json").read_text()) == json.loads(
            (pipe / "model_index.json").read_text())
        for name in COMPONENTS:
            want, got = leaves(sf.load(pipe, component=name)), leaves(sf.load(dst, component=name))
            assert got.keys() == want.keys(), name
            for k, v in got.items():
                assert v.dtype == np.float32, k
                np.testing.assert_array_equal(v, want[k], err_msg=f"{name} {k}")


# ---------------------------------------------------------------------------------------------
# (b) against diffusers' own LDM converters
# ---------------------------------------------------------------------------------------------


def _assert_same(source, want: dict, label: str):
    got = dict(source.items(source.keys()))
    assert sorted(got) == sorted(want), (label, sorted(set(got) ^ set(want))[:5])
    for k, v in got.items():
        assert v.shape == tuple(want[k].shape) == tuple(source.shape(k)), (label, k)
        np.testing.assert_array_equal(v, want[k].numpy(), err_msg=f"{label} {k}")


def test_matches_diffusers_converters(ldm):
    pipe, file, sd = ldm
    sources = ldm_pipeline_sources(file, pipe)
    assert list(sources) == ["unet", "vae", "text_encoder"]
    unet_cfg, vae_cfg = (json.loads((pipe / n / "config.json").read_text()) for n in ("unet", "vae"))
    _assert_same(sources["unet"][1], convert_ldm_unet_checkpoint(sd, unet_cfg), "unet")
    _assert_same(sources["vae"][1], convert_ldm_vae_checkpoint(sd, vae_cfg), "vae")
    # diffusers keeps CLIP's position_ids buffer (transformers ignores it on load); we drop it
    clip = convert_ldm_clip_checkpoint(sd)
    assert clip.pop("text_model.embeddings.position_ids").shape == (1, 77)
    _assert_same(sources["text_encoder"][1], clip, "text_encoder")


def test_three_level_unet_with_linear_projections(tmp_path):
    """An SD2-like UNet (3 levels, per-level heads, linear proj_in/out): its middle level has
    attention *and* an upsampler, which LDM then numbers ``.2.conv``. Only the UNet is in the
    file (the pipeline's other components are skipped)."""
    pipe = tmp_path / "pipe"
    randomize(diffusers.UNet2DConditionModel(**UNETS["sd2"]), 5, std=0.1).save_pretrained(pipe / "unet")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    sd = ldm_state_dict(pipe, {"unet": COMPONENTS["unet"]})
    # layers_per_block 1: two output blocks per level, the last of each ending with the upsampler
    assert "model.diffusion_model.output_blocks.3.2.conv.weight" in sd  # up level 1: res, attention, upsampler
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd  # up level 0: res, upsampler
    save_file(sd, tmp_path / "unet.safetensors")
    sources = ldm_pipeline_sources(tmp_path / "unet.safetensors", pipe)
    assert list(sources) == ["unet"]
    raw, source = sources["unet"]
    _assert_same(source, convert_ldm_unet_checkpoint(sd, raw), "unet")
    _assert_same(source, load_file(pipe / "unet" / COMPONENTS["unet"]), "unet")
    p = plan(raw, source)
    assert len(p.targets) == len(source.keys())


# ---------------------------------------------------------------------------------------------
# (c) the converted pipeline generates what the diffusers directory does
# ---------------------------------------------------------------------------------------------


def test_generates_the_same_latents(ldm, tmp_path):
    pipe, file, _ = ldm
    sf.convert(file, tmp_path / "out", config=pipe, progress=False)
    noise = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    want = sf.Pipeline.from_diffusers(pipe)("a cat", noise=noise, steps=2, output_type="latent")
    got = sf.Pipeline.from_diffusers(tmp_path / "out")("a cat", noise=noise, steps=2, output_type="latent")
    assert np.all(np.isfinite(got)) and np.any(got != noise)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# (d) bad input: a clear error, nothing written
# ---------------------------------------------------------------------------------------------


def _bad_file(tmp_path, sd, name, drop=(), **extra):
    out = {k: v for k, v in sd.items() if k not in drop}
    out.update(extra)
    save_file(out, tmp_path / name)
    return tmp_path / name


def _fails(src, pipe, dst, match, capsys):
    with pytest.raises(sf.ConversionError, match=match):
        sf.convert(src, dst, config=pipe, progress=False)
    assert cli(["convert", str(src), str(dst), "--config-from", str(pipe), "-q"]) == 1
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not dst.exists() and list(dst.parent.iterdir()) == []


def test_bad_files(ldm, tmp_path, capsys):
    pipe, _, sd = ldm
    outs = tmp_path / "outs"
    outs.mkdir()
    dst = outs / "out"
    one = torch.zeros(3)
    # an LDM name no map knows, inside a component: the planner reports it by its file name
    extra = "model.diffusion_model.input_blocks.1.0.extra_layers.0.weight"
    _fails(_bad_file(tmp_path, sd, "extra.safetensors", **{extra: one}), pipe, dst, re.escape(repr(extra)), capsys)
    # ...and outside every component
    _fails(_bad_file(tmp_path, sd, "stray.safetensors", some_buffer=one), pipe, dst,
           r"unexpected tensor\(s\) 'some_buffer' outside the LDM components", capsys)
    # a missing weight (named as the module's parameter it would fill)
    _fails(_bad_file(tmp_path, sd, "missing.safetensors", drop={"first_stage_model.decoder.up.0.block.1.conv2.weight"}),
           pipe, dst, r"missing tensor\(s\) 'decoder\.up_blocks\.1\.resnets\.1\.conv2\.kernel'", capsys)
    # a mis-shaped one
    wrong = {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 1, 1)}
    _fails(_bad_file(tmp_path, sd, "shape.safetensors", **wrong), pipe, dst, r"tensor 'conv_out\.weight': shape",
           capsys)
    # not an LDM file: a diffusers model file
    _fails(pipe / "unet" / COMPONENTS["unet"], pipe, dst,
           "not a Stable Diffusion checkpoint in the original LDM layout", capsys)
    # SD 1.x's CLIP and SD 2.x's OpenCLIP side by side: two encoders for one text_encoder
    _fails(_bad_file(tmp_path, sd, "openclip.safetensors",
                     **{"cond_stage_model.model.positional_embedding": torch.zeros(77, 8)}),
           pipe, dst, r"both cond_stage_model\.transformer\.\* and cond_stage_model\.model\.\* tensors", capsys)
    # an SDXL embedder in a file whose pipeline directory has no text_encoder_2
    _fails(_bad_file(tmp_path, sd, "sdxl.safetensors",
                     **{"conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)}),
           pipe, dst, r"no text_encoder_2/config\.json, needed for the conditioner\.embedders\.1\.model\.", capsys)
    # the whole file without --config-from: said to be an LDM/SGM file and how it converts (it was "no known layout")
    assert cli(["convert", str(ldm[1]), str(dst), "-q"]) == 1
    err = capsys.readouterr().err
    assert "an SD 1.x/2.x/SDXL single file in the LDM/SGM layout (model.diffusion_model.*): it converts as a " \
           "pipeline with the configs of a diffusers pipeline directory, convert FILE OUT --config-from " \
           "PIPELINE_DIR" in err, err
    assert not dst.exists()
    # a latent scale other than the pipeline VAE's
    _fails(_bad_file(tmp_path, sd, "scale.safetensors", scale_factor=torch.tensor(0.13025)), pipe, dst,
           "scale_factor 0.1302.* differs from the pipeline's vae scaling_factor 0.18215", capsys)


def test_pipeline_directory_lacking_a_component(ldm, tmp_path, capsys):
    pipe, file, _ = ldm
    shutil.copytree(pipe, tmp_path / "novae", ignore=shutil.ignore_patterns("vae"))
    (tmp_path / "outs").mkdir()
    _fails(file, tmp_path / "novae", tmp_path / "outs" / "out",
           r"no vae/config\.json, needed for the first_stage_model\.", capsys)


def test_configs_only_pipeline_directory(ldm, tmp_path):
    """The usual config source of a single file: a pipeline directory with configs and tokenizer
    but no weights (what ``from_single_file(config=...)`` downloads)."""
    pipe, file, _ = ldm
    shutil.copytree(pipe, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    sf.convert(file, tmp_path / "out", config=tmp_path / "configs", progress=False)
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert sorted(record["converted"]) == sorted(COMPONENTS)
    assert sorted(record["copied"]) == ["scheduler", "tokenizer"]
    for name in COMPONENTS:
        want, got = leaves(sf.load(pipe, component=name)), leaves(sf.load(tmp_path / "out", component=name))
        assert all(np.array_equal(v, want[k]) for k, v in got.items()) and got.keys() == want.keys()


def test_delta_and_lora_on_a_single_file(ldm, tmp_path, capsys):
    """``--delta`` (to the UNet) and ``--lora`` (to each component its keys name) on a single file
    give what they give on the pipeline directory the file was written from."""
    pipe, file, _ = ldm
    gen = torch.Generator().manual_seed(3)
    unet_sd = load_file(pipe / "unet" / COMPONENTS["unet"])
    (tmp_path / "delta").mkdir()
    shutil.copy(pipe / "unet" / "config.json", tmp_path / "delta")
    save_file({k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in unet_sd.items()},
              tmp_path / "delta" / "diffusion_pytorch_model.v0-1.safetensors")
    lora = {}
    text_sd = load_file(pipe / "text_encoder" / COMPONENTS["text_encoder"])
    for component, sd, suffix in (("unet", unet_sd, "attn2.to_k.weight"), ("text_encoder", text_sd, "q_proj.weight")):
        key = next(k for k in sorted(sd) if k.endswith(suffix))
        out, inp = sd[key].shape
        lora[f"{component}.{key[:-len('.weight')]}.lora_A.weight"] = torch.randn(2, inp, generator=gen)
        lora[f"{component}.{key[:-len('.weight')]}.lora_B.weight"] = torch.randn(out, 2, generator=gen)
    save_file(lora, tmp_path / "lora.safetensors")
    extra = ["--delta", str(tmp_path / "delta"), "--lora", f"{tmp_path / 'lora.safetensors'}:0.5", "-q"]
    assert cli(["convert", str(file), str(tmp_path / "file"), "--config-from", str(pipe), *extra]) == 0
    assert cli(["convert", str(pipe), str(tmp_path / "dir"), *extra]) == 0
    for name in COMPONENTS:
        want = leaves(sf.load(tmp_path / "dir", component=name))
        got = leaves(sf.load(tmp_path / "file", component=name))
        base = leaves(sf.load(pipe, component=name))
        changed = any(not np.array_equal(want[k], base[k]) for k in want)
        assert got.keys() == want.keys() and changed == (name != "vae"), name
        for k, v in got.items():
            np.testing.assert_array_equal(v, want[k], err_msg=f"{name} {k}")
    assert cli(["convert", str(file), str(tmp_path / "v"), "--config-from", str(pipe), "--variant", "fp16", "-q"]) == 1
    assert "a single file is read as is" in capsys.readouterr().err and not (tmp_path / "v").exists()
