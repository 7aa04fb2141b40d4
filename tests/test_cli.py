"""The CLI's paths not covered beside the features they drive: ``bench``, the export hints a
pipeline directory gives (``_model_dir_hints``), a decoder export's ``--latent-scale``."""

from __future__ import annotations

import json

import diffusers
import pytest
from conftest import VAES, make_sd3, randomize

from streamflow_jax.cli import _model_dir_hints
from streamflow_jax.cli import main as cli
from streamflow_jax.pipelines import DIGITS_DIR


def test_bench_embedded_model_prints_one_json_line(capsys):
    """``bench`` without a model times the embedded digits model (its conditioning table gives
    the text length)."""
    assert cli(["bench", "--batch", "2", "--steps", "2", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["model"] == str(DIGITS_DIR) and rec["backend"] == "xla"
    assert (rec["batch"], rec["latent"], rec["steps"]) == (2, 16, 2)
    assert rec["first_call_s"] > 0 and rec["sample_s"] > 0
    assert rec["images_per_s"] == pytest.approx(2 / rec["sample_s"], rel=0.02)


def test_bench_options_and_refusals(tmp_path, capsys):
    make_sd3(tmp_path / "sd3")
    assert cli(["bench", str(tmp_path / "sd3"), "--batch", "1", "--steps", "1", "--repeats", "1", "--latent", "6",
                "--text-len", "5"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["batch"], rec["latent"], rec["steps"]) == (1, 6, 1)
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0).save_pretrained(tmp_path / "vae")
    assert cli(["bench", str(tmp_path / "vae")]) == 1
    assert "bench samples a velocity model, got AutoencoderKL" in capsys.readouterr().err
    assert cli(["bench", str(tmp_path / "sd3"), "--latent", "7"]) == 1  # SD3 latents are even
    assert "not a positive multiple of 2" in capsys.readouterr().err
    assert cli(["bench", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err


def test_model_dir_hints(tmp_path):
    """(latent scale, text length): from vae/ (its factor) and conditioning.safetensors; 1 for a
    pipeline without a VAE (pixel space); nothing for a plain model directory."""
    assert _model_dir_hints(DIGITS_DIR) == (1, 1)
    pipe = tmp_path / "pipe"
    randomize(diffusers.AutoencoderKL(**VAES["sd3"]), 0).save_pretrained(pipe / "vae")  # 3 levels: x4
    (pipe / "model_index.json").write_text("{}")
    assert _model_dir_hints(pipe) == (4, None)
    assert _model_dir_hints(pipe / "vae") == (None, None)


@pytest.fixture
def specs(monkeypatch):
    """The (class name, spec) of each export the CLI asks for, caught on its way to
    ``export_onnx`` (exporting itself is test_export's business)."""
    import types

    from streamflow_jax import export

    caught = []

    def fake_export(model, spec, out, **kwargs):
        caught.append((model.class_name, spec))
        return types.SimpleNamespace(onnx_path=out)

    monkeypatch.setattr(export, "export_onnx", fake_export)
    return caught


def test_export_of_a_pipeline_dir_uses_its_vae_scale(tmp_path, capsys, specs):
    """``export PIPELINE --resolution 16``: the pipeline's VAE (x2) makes that latent 8; the
    default 8 would have made it 2."""
    from streamflow_jax.export import Range

    pipe = tmp_path / "pipe"
    make_sd3(pipe / "transformer")
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0).save_pretrained(pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                       "transformer": ["diffusers", "SD3Transformer2DModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"]}))
    assert cli(["export", str(pipe), str(tmp_path / "onnx"), "--batch", "1:1:2", "--resolution", "16",
                "--text-len", "5", "-q"]) == 0
    ((name, spec),) = specs
    assert name == "SD3Transformer2DModel"
    assert spec.dims["H"] == spec.dims["W"] == Range(8, 8, 8)
    assert "exported SD3Transformer2DModel velocity" in capsys.readouterr().out
    # the digits directory: no VAE (pixel space) and its conditioning table's text length
    assert cli(["export", str(DIGITS_DIR), str(tmp_path / "digits"), "--resolution", "16", "-q"]) == 0
    spec = specs[-1][1]
    assert spec.dims["H"] == Range(16, 16, 16)
    assert {t.name: t.shape for t in spec.inputs}["encoder_hidden_states"][1] == 1


def test_decoder_export_with_its_own_latent_scale(tmp_path, specs):
    """A decoder's ``--latent-scale`` equal to its factor: the resolution becomes latents by it."""
    from streamflow_jax.export import Range

    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0, std=0.1).save_pretrained(tmp_path / "vae")  # x2
    assert cli(["export", str(tmp_path / "vae"), str(tmp_path / "onnx"), "--batch", "1:1:1", "--resolution", "8:8:16",
                "--latent-scale", "2", "-q"]) == 0
    ((_, spec),) = specs
    assert spec.method == "decode_latents" and spec.dims["H"] == Range(4, 4, 8)


def test_decoder_export_refuses_a_contradicting_latent_scale(tmp_path, capsys, specs):
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0, std=0.1).save_pretrained(tmp_path / "vae")  # x2
    assert cli(["export", str(tmp_path / "vae"), str(tmp_path / "onnx"), "--batch", "1:1:1", "--resolution", "16",
                "--latent-scale", "8", "-q"]) == 1
    assert "latent-scale" in capsys.readouterr().err and not specs
