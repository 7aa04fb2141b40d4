"""The CLI's paths not covered beside the features they drive: ``bench``, the export hints a
pipeline directory gives (``pipeline_facts``), a decoder export's ``--latent-scale``."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
from conftest import VAES, make_sd3, randomize

from streamflow_jax.cli import pipeline_facts
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
    assert (rec["quantize"], rec["strategy"], rec["dtype"]) == (None, None, "float32")  # no mesh, no strategy
    # an FP8 checkpoint is reported as FP8 without --quantize (it said null)
    assert cli(["convert", str(tmp_path / "sd3"), str(tmp_path / "sd3-fp8"), "--quantize", "fp8", "-q"]) == 0
    capsys.readouterr()
    assert cli(["bench", str(tmp_path / "sd3-fp8"), "--batch", "1", "--steps", "1", "--repeats", "1", "--latent", "6",
                "--text-len", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["quantize"] == "fp8"
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 0).save_pretrained(tmp_path / "vae")
    assert cli(["bench", str(tmp_path / "vae")]) == 1
    assert "bench samples a velocity model, got AutoencoderKL" in capsys.readouterr().err
    assert cli(["bench", str(tmp_path / "sd3"), "--latent", "7"]) == 1  # SD3 latents are even
    assert "--latent 7: latent height 7 is not a positive multiple of 2" in capsys.readouterr().err
    assert cli(["bench", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err


def test_bf16_export_for_onnxruntime_says_this_cpu_cannot_run_it(tmp_path, capsys):
    """It exported without a word, and ONNX Runtime's CPU provider then refused the graph
    (NOT_IMPLEMENTED, a bf16 Conv); generate, bench and serve refuse the pair outright."""
    pytest.importorskip("jax2onnx")
    from streamflow_jax.backends.onnxruntime import default_providers

    if "CUDAExecutionProvider" in default_providers():
        pytest.skip("ONNX Runtime with CUDA here")
    make_sd3(tmp_path / "sd3")
    assert cli(["export", str(tmp_path / "sd3"), str(tmp_path / "out"), "--dtype", "bfloat16", "--batch", "1:1:1",
                "--resolution", "16:16:16", "--latent-scale", "2", "--text-len", "5", "-q"]) == 0
    assert "note: ONNX Runtime's CPU provider here cannot run it (no bfloat16 kernels" in capsys.readouterr().out


def test_pipeline_facts(tmp_path):
    """(latent scale, text length): from vae/ (its factor) and conditioning.safetensors; 1 for a
    pipeline without a VAE (pixel space); nothing for a plain model directory."""
    assert pipeline_facts(DIGITS_DIR) == (1, 1)
    pipe = tmp_path / "pipe"
    randomize(diffusers.AutoencoderKL(**VAES["sd3"]), 0).save_pretrained(pipe / "vae")  # 3 levels: x4
    (pipe / "model_index.json").write_text("{}")
    assert pipeline_facts(pipe) == (4, None)
    assert pipeline_facts(pipe / "vae") == (None, None)


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


# ---------------------------------------------------------------------------------------------
# What a new user hit: one line for every bad flag, checked before any work
# ---------------------------------------------------------------------------------------------


def test_generate_says_what_its_model_and_image_are_not(tiny_sd3, tmp_path, capsys, monkeypatch):
    """``--model`` naming one model (not a pipeline) and an image too large to decode: one line
    each, before loading (a DecompressionBombError traceback before)."""
    from PIL import Image

    src, _ = tiny_sd3
    assert cli(["generate", "--model", str(src), "--prompt", "a cat"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a single model, not a pipeline (no model_index.json)" in err, err
    Image.new("L", (16, 16)).save(tmp_path / "digit.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels: more than twice that is a bomb
    assert cli(["generate", "--image", str(tmp_path / "digit.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--image {tmp_path / 'digit.png'}: too large to decode" in err, err
    (tmp_path / "notes.txt").write_text("not an image")
    assert cli(["generate", "--image", str(tmp_path / "notes.txt")]) == 1
    assert "not an image Pillow can read" in capsys.readouterr().err


def test_serve_on_a_port_in_use_is_one_line_before_loading(capsys, monkeypatch):
    """A port in use: one line naming host and port, exit 1, before the model is loaded (uvicorn
    logged it after compiling and exited 3)."""
    import socket

    pytest.importorskip("uvicorn")
    from streamflow_jax.serve import app

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before binding the port")

    monkeypatch.setattr(app, "load_served", no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--host 127.0.0.1 --port {port}: cannot listen there" in err, err
    assert cli(["serve", "--host", "no-such-host.invalid"]) == 1
    assert "--host no-such-host.invalid: cannot resolve it" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["generate", "--guidance", "inf"], "--guidance must be a finite number, got inf"),
    (["generate", "--seed", "99999999999999999999"], "--seed must be an integer in [0, 2**32)"),
    (["generate", "--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
    (["generate", "--steps", "20000"], "--steps must be in [1, 1000], got 20000"),
    (["generate", "--steps", "0"], "--steps must be in [1, 1000], got 0"),
    (["generate", "--slots", "0", "--stream"], "--slots must be >= 1, got 0"),
    (["generate", "--streams", "-2", "--stream"], "--streams must be >= 1, got -2"),
    (["generate", "--ticks-per-call", "0", "--stream"], "--ticks-per-call must be >= 1, got 0"),
    (["generate", "--ticks-per-call", "65", "--stream"], "--ticks-per-call must be at most 64, got 65"),
    (["generate", "--height", "0"], "--height is for prompt pipelines"),
    (["generate", "--width=-16"], "--width is for prompt pipelines"),
    (["generate", "--prompt", "a cat"], "--prompt is for prompt pipelines"),
    (["generate", "--negative-prompt", "cat"],
     "--negative-prompt: the digits model takes one digit, \"0\" to \"9\", as a prompt; got 'cat'"),
    (["generate", "--negative-prompt", "3", "--guidance", "1"], "--negative-prompt: negative prompt '3' is ignored: "
                                                                "classifier-free guidance is off"),
    (["generate", "--strength", "0.5"], "--strength is for image-to-image: give --image too"),
    (["generate", "--image", "x.png", "--strength", "1.5"], "--strength must be in (0, 1], got 1.5"),
    (["generate", "--out", "digits.txt"], "unknown image extension '.txt'"),
    # formats Pillow reads and cannot write: a traceback after sampling (KeyError: 'PSD')
    (["generate", "--out", "x.psd"], "--out x.psd: cannot write grey images as PSD (Pillow cannot write it)"),
    (["generate", "--out", "x.xbm"], "--out x.xbm: cannot write grey images as XBM (OSError: cannot write mode L"),
    (["generate", "--out", "/no/such/dir/d.png"], "directory /no/such/dir does not exist"),
    (["generate", "--out", "/"], "--out /: a directory; give an image file, e.g. /out.png"),  # said 'extension'
    (["serve", "--size", "abc"], "--size must be WIDTHxHEIGHT in pixels"),  # did not name the flag
    (["serve", "--taesd", "/no/such/taesd"], "--taesd /no/such/taesd: no such directory"),
    (["convert", "src", "dst", "--quantize", "fp8", "--calibrate", "f.txt", "--calibration-steps", "0"],
     "--calibration-steps must be in [1, 1000], got 0"),
    (["bench", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["bench", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["bench", "--steps", "1001"], "--steps must be in [1, 1000], got 1001"),
    (["bench", "--devices", "0"], "--devices must be >= 1, got 0"),
    (["serve", "--max-queue", "-1"], "--max-queue must be >= 0, got -1"),
    (["serve", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["serve", "--timeout", "nan"], "--timeout must be a positive number of seconds, got nan"),
    (["serve", "--slots", "0"], "--slots must be >= 1, got 0"),
    (["serve", "--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["serve", "--max-streams", "0"], "--max-streams must be >= 1, got 0"),
    (["serve", "--ticks-per-call", "0"], "--ticks-per-call must be >= 1, got 0"),
    (["serve", "--ticks-per-call", "65"], "--ticks-per-call must be at most 64, got 65"),
    (["serve", "--ticks-per-call", "2", "--backend", "onnxruntime"], "--ticks-per-call 2 goes with --backend xla"),
    (["serve", "/no/such/dir"], "/no/such/dir: not a directory"),
    # flags that do not apply are refused, not ignored; values checked before any work
    (["generate", "--guidance", "1e39"], "--guidance 1e+39 is beyond float32's range"),
    (["generate", "--strategy", "tensor"], "--strategy tensor goes with --devices N"),
    (["bench", "--strategy", "replicate"], "--strategy replicate goes with --devices N"),
    (["serve", "--strategy", "tensor"], "--strategy tensor goes with --devices N"),
    (["generate", "--slots", "4"], "--slots goes with --stream"),
    (["generate", "--streams", "2"], "--streams goes with --stream"),
    (["generate", "--ticks-per-call", "4"], "--ticks-per-call goes with --stream"),
    (["generate", "--stream", "--ticks-per-call", "4", "--backend", "onnxruntime"],
     "--ticks-per-call 4 goes with --backend xla"),
    (["generate", "--image", ""], "--image: an empty path"),
    (["generate", "--image", "/no/such/digit.png"], "--image /no/such/digit.png: no such file"),
    (["generate", "--image", "/"], "--image /: a directory, not an image file"),
    (["generate", "--model", "/no/such/dir"], "--model /no/such/dir: no such file or directory"),
    (["generate", "--model", "/etc/hostname"], "--model /etc/hostname: not a directory"),
    (["generate", "--model", "/"], "neither a pipeline (no model_index.json) nor a digits model"),
    (["serve", "--max-steps", "5000"], "--max-steps must be in [1, 1000], got 5000"),
    (["convert", "src", "dst", "--delta-variant", "fp16"], "--delta-variant goes with --delta DIR"),
    (["export", "m", "o", "--compute-capability", "8.6"], "--compute-capability goes with --backend tensorrt"),
    (["export", "m", "o", "--opt-level", "2"], "--opt-level goes with --backend tensorrt"),
    (["export", "m", "o", "--tensorrt", "tensorrt_rtx"], "--tensorrt goes with --backend tensorrt"),
    (["export", "m", "o", "--backend", "tensorrt", "--opt-level", "9"], "--opt-level must be in [0, 5]"),
    (["export", "m", "o", "--batch", "0:1:8"], "--batch 0:1:8: need 1 <= min <= opt <= max"),
    (["export", "m", "o", "--resolution", "big"], "--resolution big: expected min:opt:max integers"),
    (["export", "m", "o", "--opset", "17"], "--opset 17: the export takes an integer from 23 (what its graph needs)"),
    (["export", "m", "o", "--opset", "1000"], "--opset 1000: the export takes an integer from 23"),  # wrote a graph
    (["export", "m", "o", "--opset", "25"], "to 24 (the newest ONNX Runtime and TensorRT load"),  # Swish: none loaded it
    (["bench", "--devices", "2", "--backend", "onnxruntime"], "--devices 2 runs the model over a mesh with XLA"),
    # an export, then ONNX Runtime's NOT_IMPLEMENTED for a bf16 Conv (its CPU provider)
    (["generate", "--backend", "onnxruntime", "--dtype", "bfloat16"], "ONNX Runtime's CPU provider has no bfloat16"),
])
def test_bad_flags_get_one_line_before_any_work(argv, message, capsys, monkeypatch):
    from streamflow_jax import checkpoint

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before checking the flags")

    monkeypatch.setattr(checkpoint, "load", no_loading)
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_prompt_pipeline_flag_messages(tmp_path, capsys):
    """``--windows 0`` names the flag, not the scheduler config; a non-pipeline directory is said
    to be one before loading; --height 0 says positive, not 'multiple of 2'."""
    from conftest import make_perflow_pipeline

    pipe = make_perflow_pipeline(tmp_path / "pipe")
    assert cli(["generate", "--model", str(pipe), "--prompt", "a cat", "--windows", "0", "--out",
                str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert "num_time_windows (--windows) must be an integer >= 1, got 0" in err and "scheduler_config" not in err
    assert cli(["generate", "--model", str(pipe), "--prompt", "a cat", "--height", "0", "--out",
                str(tmp_path / "o.png")]) == 1
    assert "--height 0: image height must be positive, got 0" in capsys.readouterr().err
    assert cli(["generate", "--model", str(pipe), "--prompt", "a cat", "--width", "15", "--out",
                str(tmp_path / "o.png")]) == 1
    assert "--width 15: image width 15 is not a multiple of" in capsys.readouterr().err
    assert cli(["generate", "--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "o.png")]) == 1
    assert "no model_index.json" in capsys.readouterr().err
    from streamflow_jax.pipelines import PeRFlowPipeline

    for guidance in ([], ["--guidance", "1"]):  # PeRFlow's default is no guidance: the negative prompt would go unread
        loads = []  # refused from the pipeline class and the flags, before any weight is read
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(PeRFlowPipeline, "load", classmethod(lambda *a, **k: loads.append(1)))
            assert cli(["generate", "--model", str(pipe), "--prompt", "a cat", "--negative-prompt", "blurry", *guidance,
                        "--out", str(tmp_path / "o.png")]) == 1
        assert not loads
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--negative-prompt: negative prompt 'blurry' is ignored: classifier-free " \
            "guidance is off" in err, err
    assert not (tmp_path / "o.png").exists()
    # a TAESD that is not there is refused before the UNet and the text encoder load, naming the flag
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PeRFlowPipeline, "load", classmethod(lambda *a, **k: loads.append(1)))
        assert cli(["generate", "--model", str(pipe), "--prompt", "a cat", "--taesd", str(tmp_path / "taesd"),
                    "--out", str(tmp_path / "o.png")]) == 1
        assert f"--taesd {tmp_path / 'taesd'}: no such directory" in capsys.readouterr().err
        with pytest.raises(ValueError, match="no config.json: not a diffusers AutoencoderTiny directory"):
            PeRFlowPipeline.from_diffusers(pipe, taesd=tmp_path)  # the library's own check, before loading
    assert not loads
    assert cli(["generate", "--model", str(pipe), "--prompt", "a cat", "--max-sequence-length", "100",
                "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-sequence-length 100: this pipeline's CLIP text is" in err, err
    # export: a taken output directory refused before the model loads (it was after, with a full load)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.MonkeyPatch.context() as mp:
        from streamflow_jax import cli as cli_module

        mp.setattr(cli_module, "_load_for_graph", lambda *a, **k: loads.append(1))
        assert cli(["export", str(pipe), str(tmp_path / "taken")]) == 1
    assert not loads
    assert "taken: already exists and is not empty" in capsys.readouterr().err
    assert cli(["export", str(DIGITS_DIR), str(tmp_path / "e"), "-q", "--resolution", "4096"]) == 1
    assert "--resolution 4096: resolution up to 4096 px exceeds" in capsys.readouterr().err


def test_out_of_memory_and_a_file_for_a_model_are_said_plainly(tmp_path, capsys):
    """XLA's out-of-memory error gets what to lower, on one line; a file that is no model is said to
    be one (it was 'unreadable safetensors file (... header too large)'). The error is XLA's own
    text, raised where the batch runs: a real one depends on the machine's memory and overcommit
    (``generate --per-digit 100000`` here: 864 GB asked, refused at once)."""
    from streamflow_jax.pipelines import DigitsPipeline

    def exhausted(*args, **kwargs):
        raise RuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 863776018032 bytes.\n"
                           "BufferAssignment OOM Debugging.\n(the allocator's dump)")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DigitsPipeline, "__call__", exhausted)
        assert cli(["generate", "--per-digit", "100000", "--steps", "1", "-q", "--out", str(tmp_path / "d.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: out of memory (INTERNAL: Error dispatching computation: Out of memory " \
        "allocating 863776018032 bytes.): fewer images at once (--per-digit" in err, err
    readme = tmp_path / "README.md"
    readme.write_text("# not a model\n" * 100)
    assert cli(["bench", str(readme)]) == 1
    err = capsys.readouterr().err
    assert f"{readme}: not a safetensors file (give a model or pipeline directory, or a .safetensors" in err, err


def test_version_and_plain_help(capsys):
    from streamflow_jax import __version__

    with pytest.raises(SystemExit) as e:
        cli(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"streamflow-jax {__version__}"
    with pytest.raises(SystemExit):
        cli(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "Rectified-flow image generators" in out


@pytest.mark.parametrize("argv,hint", [
    (["generate", "--num-inference-steps", "4"], "(--num-inference-steps: --steps?)"),
    (["generate", "--negative_prompt", "x"], "(--negative_prompt: --negative-prompt?)"),
    (["convert", "a", "b", "--quantise", "fp8"], "(--quantise: --quantize?)"),
    (["serve", "--max_queue=3"], "(--max_queue: --max-queue?)")])
def test_unknown_flags_name_the_command_and_a_guess(capsys, argv, hint):
    """An unknown flag is the command's error, with its usage, and what the flag may have meant
    (diffusers' names, underscores, typos); it was the top-level usage and no hint."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: streamflow-jax {argv[0]}" in err
    given = " ".join(argv[-2:] if len(argv) > 2 else argv[-1:])
    assert err.strip().endswith(f"streamflow-jax {argv[0]}: error: unrecognized arguments: {given} {hint}"), err


def test_an_unknown_flag_before_the_command_is_the_programs(capsys):
    """``streamflow-jax --verbose generate``: the top-level usage and error (it was generate's,
    as if generate had no --verbose)."""
    with pytest.raises(SystemExit) as e:
        cli(["--verbose", "generate", "--steps", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: streamflow-jax [-h]" in err
    assert err.strip().endswith("streamflow-jax: error: unrecognized arguments: --verbose (before the command, only "
                                "--help and --version; generate's flags come after it)"), err


def test_export_and_bench_of_a_perflow_pipeline_and_a_converted_pipeline(tmp_path, capsys, specs):
    """A PeRFlow pipeline directory (diffusers or converted) exports and benches its UNet with
    the scheduler's adapter; a base model's scheduler takes --prediction-type/--windows."""
    import streamflow_jax as sf
    from conftest import make_perflow_pipeline

    pipe = make_perflow_pipeline(tmp_path / "pipe")
    sf.convert(pipe, tmp_path / "converted", progress=False)
    for source in (pipe, tmp_path / "converted"):
        assert cli(["export", str(source), str(tmp_path / f"onnx-{source.name}"), "--batch", "1:1:2", "-q"]) == 0
        assert cli(["bench", str(source), "--batch", "1", "--steps", "1", "--repeats", "1", "--latent", "8"]) == 0
        rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (rec["batch"], rec["latent"]) == (1, 8)
    spec = specs[-1][1]
    assert specs[-1][0] == "UNet2DConditionModel" and spec.dims["B"].max == 2
    # PeRFlow's hub layout: the base model's scheduler; refused until told what the UNet predicts
    base = make_perflow_pipeline(tmp_path / "hub", scheduler={"_class_name": "PNDMScheduler",
                                                              "prediction_type": "epsilon"})
    assert cli(["bench", str(base), "--batch", "1", "--steps", "1", "--repeats", "1"]) == 1
    assert "--prediction-type" in capsys.readouterr().err
    assert cli(["bench", str(base), "--batch", "1", "--steps", "1", "--repeats", "1", "--prediction-type",
                "diff_eps", "--windows", "2"]) == 0
    capsys.readouterr()
    assert cli(["bench", "--prediction-type", "diff_eps", "--batch", "1", "--steps", "1"]) == 1
    assert "apply to UNets" in capsys.readouterr().err


@pytest.mark.parametrize("setting,where", [("0", None), ("off", None), ("none", None), ("on", "root"), ("DIR", "dir"),
                                           ("FILE", "file"), ("~", "home"), ("on", "relative"),
                                           ("rel-xla", "relative-dir")])
def test_xla_cache_setting(tmp_path, setting, where):
    """$STREAMFLOW_JAX_XLA_CACHE: 0/off/none turns the persistent cache off, on keeps it under
    $STREAMFLOW_JAX_CACHE/xla, a path moves it there; a path that cannot hold it is one warning
    naming it, and the cache stays off (JAX warned once per program, naming no variable);
    $STREAMFLOW_JAX_CACHE expands ~ (it made a directory named "~"); relative paths become
    absolute against the working directory (JAX kept them relative, to be read against
    whichever directory the process had moved to)."""
    import subprocess
    import sys

    (tmp_path / "afile").write_text("x")
    root = {"home": "~/cache-root", "relative": "rel-root"}.get(where, str(tmp_path / "root"))
    setting = {"DIR": str(tmp_path / "elsewhere"), "FILE": str(tmp_path / "afile"), "~": ""}.get(setting, setting)
    env = {**__import__("os").environ, "STREAMFLOW_JAX_CACHE": root, "STREAMFLOW_JAX_XLA_CACHE": setting,
           "HOME": str(tmp_path / "home")}
    # asked twice, as the CLI and a pipeline's loader both ask: one warning; then the directory
    # JAX was given, read after the process moved elsewhere
    done = subprocess.run([sys.executable, "-c", "import jax, os, streamflow_jax as sf\nsf.enable_compilation_cache()\n"
                           "print(sf.enable_compilation_cache())\nos.chdir('/')\n"
                           "d = jax.config.jax_compilation_cache_dir\nprint(os.path.abspath(d) if d else None)"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    want = {None: "None", "root": str(tmp_path / "root" / "xla"), "dir": str(tmp_path / "elsewhere"),
            "file": "None", "home": str(tmp_path / "home" / "cache-root" / "xla"),
            "relative": str(tmp_path / "rel-root" / "xla"), "relative-dir": str(tmp_path / "rel-xla")}[where]
    assert done.stdout.split() == [want, want]
    if where == "file":
        assert "the compilation cache stays off" in done.stderr and "afile: a file, not a directory" in done.stderr
        assert done.stderr.count("the compilation cache stays off") == 1
        assert str(tmp_path / "afile") in done.stderr and "STREAMFLOW_JAX_XLA_CACHE" in done.stderr


def test_public_names_survive_importing_every_submodule():
    """Each ``sf.NAME`` is its defining module's object even after every submodule has been
    imported: a submodule named like an export (``streamflow_jax/quantize.py`` once) is set on
    the package by the import system and shadows the export (``sf.quantize`` became a module,
    not callable, whenever the CLI, the server or a LoRA merge had imported it first)."""
    import subprocess
    import sys

    script = (
        "import importlib, pkgutil, types\n"
        "import streamflow_jax as sf\n"
        "skip = ('streamflow_jax.converters', 'streamflow_jax.__main__')  # a link to convert/; the CLI's run\n"
        "for m in pkgutil.walk_packages(sf.__path__, 'streamflow_jax.'):\n"
        "    if not m.name.startswith(skip):\n"
        "        importlib.import_module(m.name)\n"
        "for name, mod in sf._EXPORTS.items():\n"
        "    got = getattr(sf, name)\n"
        "    assert not isinstance(got, types.ModuleType), name\n"
        "    assert got is getattr(importlib.import_module(mod), name), name\n"
        "print(len(sf._EXPORTS))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) >= 19


def test_importing_the_library_changes_no_global_state(tmp_path):
    """``import streamflow_jax`` leaves JAX's configuration alone; the entry points (here a
    pipeline's loader) turn the persistent compilation cache on, under $STREAMFLOW_JAX_CACHE."""
    import subprocess
    import sys

    script = (
        "import jax\n"
        "before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)\n"
        "import streamflow_jax as sf\n"
        "after = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)\n"
        "assert before == after, (before, after)\n"
        "from streamflow_jax.pipelines import DigitsPipeline\n"
        "DigitsPipeline.load()\n"
        "print(jax.config.jax_compilation_cache_dir)\n"
    )
    env = {**__import__("os").environ, "STREAMFLOW_JAX_CACHE": str(tmp_path)}
    env.pop("STREAMFLOW_JAX_XLA_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "xla")


@pytest.mark.parametrize("name, value, message", [
    ("STREAMFLOW_JAX_GROUPNORM", "bogus", "expected auto, groups, channels or onepass"),
    ("STREAMFLOW_JAX_CONV1X1", "gemm", "expected auto, conv or dot"),
    ("STREAMFLOW_JAX_CONV_LAYOUT", "nchw", "expected auto, hwio or ohwi"),
    ("STREAMFLOW_JAX_ATTENTION", "flash", "expected auto, cudnn, xla, fp8"),
    ("STREAMFLOW_JAX_SCAN_BLOCKS", "yes", "expected auto, on or off"),
    ("STREAMFLOW_JAX_GEMM", "triton", "expected auto, xla or cublas"),
    ("STREAMFLOW_JAX_TICK", "threaded", "expected one of split, fused"),
    ("STREAMFLOW_JAX_TICK_GRAPHS", "bogus", "expected auto, on or off"),
    ("STREAMFLOW_JAX_TICKS_PER_CALL", "four", "expected an integer from 1 to 64"),
])
def test_environment_switch_typos_are_refused_before_loading(monkeypatch, capsys, tmp_path, name, value, message):
    """Every environment switch is parsed as the CLI starts: a typo is one line naming the
    variable, exit 1, nothing written; before, some were refused only once a model was traced
    (after loading), and GroupNorm's and the 1x1 switch not at all with the digits model."""
    monkeypatch.setenv(name, value)
    assert cli(["generate", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and message in err, err
    assert not list(tmp_path.iterdir())


def test_generate_and_bench_run_a_prebuilt_export(tmp_path, capsys, isolated_cache):
    """``--export DIR`` runs the velocity model from an export made by ``export`` (nothing exported
    on demand), with the XLA images; a call its profile does not take, an export of another
    model, a directory that is no export and ``--backend xla`` are each refused in one line."""
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    from PIL import Image

    export = tmp_path / "digits-onnx"
    assert cli(["export", str(DIGITS_DIR), str(export), "--batch", "1:20:20", "-q"]) == 0
    run = ["generate", "--per-digit", "1", "--steps", "3", "-q"]
    assert cli([*run, "--out", str(tmp_path / "xla.png")]) == 0
    assert cli([*run, "--backend", "onnxruntime", "--export", str(export), "--out", str(tmp_path / "ort.png")]) == 0
    assert not (isolated_cache / "exports").exists()  # the export given ran
    ours, xla = (np.asarray(Image.open(tmp_path / f), np.int16) for f in ("ort.png", "xla.png"))
    assert np.abs(ours - xla).max() <= 1  # 10 digits, guided: 20 rows of the export's 20
    capsys.readouterr()
    assert cli(["bench", "--backend", "onnxruntime", "--export", str(export), "--batch", "20", "--steps", "1",
                "--repeats", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "onnxruntime"
    assert not (isolated_cache / "exports").exists()
    from streamflow_jax.pipelines import DigitsPipeline

    pipe = DigitsPipeline.load().use_export(export, "onnxruntime")
    pipe.model = pipe.model.astype("float16")  # changed since: refused, not exported on demand behind the export
    with pytest.raises(ValueError, match="exported from other weights than this model's .float32 weights there; "
                                         "float16 weights here"):
        pipe(np.arange(10), steps=2, backend="onnxruntime")
    assert not (isolated_cache / "exports").exists()
    make_sd3(tmp_path / "sd3")
    assert cli(["export", str(tmp_path / "sd3"), str(tmp_path / "sd3-onnx"), "--batch", "1:1:2", "--resolution", "16",
                "--latent-scale", "2", "--text-len", "5", "-q"]) == 0
    capsys.readouterr()
    for argv, message in (
        (["--per-digit", "2"], "error: export {export} does not take this call: input 'x': B=40 is outside the "
                               "exported profile [1, 20]"),
        (["--export", str(tmp_path / "sd3-onnx")], "error: --export {sd3}: exported from other weights than this "
                                                   "model's (float32 weights both: another checkpoint, LoRA or adapter)"),
        (["--export", str(tmp_path)], "error: --export {tmp}: no export.json (not a streamflow-jax export directory)"),
        (["--backend", "xla"], "error: --export {export} is run by --backend onnxruntime or tensorrt"),
    ):
        assert cli([*run, "--backend", "onnxruntime", "--export", str(export), *argv,
                    "--out", str(tmp_path / "o.png")]) == 1
        err = capsys.readouterr().err
        message = message.format(export=export, sd3=tmp_path / "sd3-onnx", tmp=tmp_path)
        assert message in err and err.count("\n") == 1, err
