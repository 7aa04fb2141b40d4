"""Shared fixtures: tiny random diffusers checkpoints built and saved by the tests themselves."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

# LLVM at -O0: the suite's tiny programs compile ~15-20% faster and run as correctly (XLA uses
# no fast-math at any level; results move at the last float32 bit, as any reordering does)
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true --xla_backend_optimization_level=0")
# forced: the suite's tolerances are CPU fp32's. STREAMFLOW_JAX_TEST_PLATFORMS=cuda,cpu is the
# explicit way out, for the GPU-only tests (TensorRT engine execution on an RTX card or A100)
os.environ["JAX_PLATFORMS"] = os.environ.get("STREAMFLOW_JAX_TEST_PLATFORMS", "cpu")
# nothing under ~/.cache: the process-wide compilation cache goes to a temporary directory (each
# test's exports and engines get their own, see isolated_cache); removed when the process ends
_TMP = os.environ["STREAMFLOW_JAX_CACHE"] = tempfile.mkdtemp(prefix="streamflow-jax-tests-")
# One persistent XLA compilation cache for every process of the run: set by the first process
# (pytest, or pytest-xdist's controller), inherited by the xdist workers and the CLI/server
# subprocesses through $STREAMFLOW_JAX_XLA_CACHE. The tests build the same tiny models many times
# over; each program is compiled once.
os.environ.setdefault("STREAMFLOW_JAX_XLA_CACHE", os.path.join(_TMP, "xla"))

import jax  # noqa: E402

if os.environ["STREAMFLOW_JAX_XLA_CACHE"].lower() not in ("0", "false", "off", "no"):
    jax.config.update("jax_compilation_cache_dir", os.environ["STREAMFLOW_JAX_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

import numpy as np
import pytest


torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def pytest_unconfigure(config):
    """Each process removes its temporary cache (the first one's holds the shared XLA cache,
    and it ends after the xdist workers)."""
    import shutil

    shutil.rmtree(_TMP, ignore_errors=True)


SHARED_WORKER = {"test_serve": "serve", "test_serve_browser": "serve"}  # they share digits_server
# The longest files first, so that xdist's workers finish together: every file measured above
# ~30 s on one of CI's two cores (2026-11-29), longest first; the rest follow in file order
LONGEST_FIRST = ("test_sharding", "test_export", "test_quantize", "test_sdxl_pipeline", "test_tensorrt",
                 "test_unet", "test_sd15_pipeline", "test_lora", "test_stream", "test_sdxl_single_file",
                 "test_prompt_pipelines", "test_serve_ray", "test_digits", "test_checkpoints_you_have",
                 "test_sd2_single_file", "test_ldm_single_file", "test_serve", "test_serve_browser", "test_cli",
                 "test_serve_prompt", "test_interrupts", "test_flux")


def pytest_configure(config):
    """xdist hands the groups out in LONGEST_FIRST's order, not reordered by their test counts."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# tryfirst: xdist's worker turns the xdist_group marks into its scopes in a hook of its own,
# registered after this file's; run after it, the marks came too late and every test was a
# scope of its own (files split over both workers, their module fixtures built twice)
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test``: ``-n auto --dist loadgroup``) every test file runs on
    one worker, so that its module fixtures (converted checkpoints, exports, engines) are built
    once; the files that share the session's ``digits_server`` run on the same worker. The
    longest files are handed out first (the order within a file is kept)."""
    def name(item):
        return item.module.__name__ if item.module is not None else item.nodeid.split("::")[0]

    rank = {n: i for i, n in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(name(item), len(rank)))  # stable
    for item in items:
        item.add_marker(pytest.mark.xdist_group(SHARED_WORKER.get(name(item), name(item))))


def pytest_collection_finish(session):
    """Says so where the groups did not take (xdist marks a grouped test's id ``@group``)."""
    config = session.config
    if hasattr(config, "workerinput") and getattr(config.option, "loadgroup", False) and session.items \
            and "@" not in session.items[0].nodeid:
        import warnings

        warnings.warn("pytest-xdist did not group the tests by file (each file's module fixtures will be built "
                      "on every worker that runs part of it): see pytest-xdist issue #1386", stacklevel=1)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test stands alone: its own export/engine cache (never ~/.cache) and no runners
    left over from another test."""
    from streamflow_jax import backends

    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("STREAMFLOW_JAX_CACHE", str(root))
    backends.clear_runners()
    yield root
    backends.clear_runners()

# Tiny SD3-family configs, named after the variant each stands for. Odd head counts and
# widths on purpose (3 heads x 8, text width 12, pooled width 10).
SD3_TINY = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=3,
    joint_attention_dim=12, caption_projection_dim=24, pooled_projection_dim=10, out_channels=4,
    pos_embed_max_size=12,
)
SD35_TINY = dict(SD3_TINY, num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm")
SD35_LARGE_TINY = dict(SD3_TINY, num_layers=2, qk_norm="rms_norm", num_attention_heads=5, caption_projection_dim=40)
VARIANTS = {"sd3": SD3_TINY, "sd35_medium": SD35_TINY, "sd35_large": SD35_LARGE_TINY}


def randomize(module, seed: int, std: float = 0.2):
    """Replaces every parameter with N(0, std): diffusers' init leaves ones and zeros that could
    hide a wrong mapping (norm weights, biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def make_sd3(path, variant: str = "sd3", seed: int = 0, **overrides):
    """Builds a random ``SD3Transformer2DModel``, saves it with ``save_pretrained`` at ``path``."""
    cfg = dict(VARIANTS[variant], **overrides)
    model = randomize(diffusers.SD3Transformer2DModel(**cfg), seed).eval()
    model.save_pretrained(path)
    return model


def sd3_inputs(cfg: dict, batch: int, height: int, width: int, text_len: int = 7, seed: int = 0):
    """Random NHWC latents, conditioning and a different t per element (numpy float32)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, height, width, cfg["in_channels"]), dtype=np.float32)
    cond = {
        "encoder_hidden_states": rng.standard_normal((batch, text_len, cfg["joint_attention_dim"]), dtype=np.float32),
        "pooled_projections": rng.standard_normal((batch, cfg["pooled_projection_dim"]), dtype=np.float32),
    }
    t = np.linspace(0.95, 0.1, batch).astype(np.float32) if batch > 1 else np.array([0.6], np.float32)
    return x, t, cond


def torch_velocity(model, x, t, cond):
    """diffusers forward on NHWC numpy inputs, as SD3's pipeline calls it (timestep = t*1000)."""
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
            encoder_hidden_states=torch.from_numpy(cond["encoder_hidden_states"]),
            pooled_projections=torch.from_numpy(cond["pooled_projections"]),
            timestep=torch.from_numpy(t) * 1000,
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture
def tiny_sd3(tmp_path):
    path = tmp_path / "sd3_tiny"
    model = make_sd3(path)
    return path, model


# ---------------------------------------------------------------------------------------------
# Tiny configs and assets shared by several test files
# ---------------------------------------------------------------------------------------------

CLIP = dict(vocab_size=530, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=16, bos_token_id=527, eos_token_id=528, pad_token_id=528)  # as _write_tiny_clip_vocab numbers them


def with_text_model(state: dict) -> dict:
    """transformers 5 saves ``CLIPTextModel`` without ``text_model.``; diffusers' converters keep it."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


def write_tiny_clip_vocab(path):
    """A byte-level vocabulary (every byte, alone and word-final) plus a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "o n</w>", "i n", "in g</w>", "r e", "p h", "o t",
              "ph ot", "phot o</w>", "s t", "st r", "str ing</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


UNETS = {
    # SD1.5-like: int attention_head_dim (read as a head count), conv projections, 768-d text
    "sd15": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                 norm_num_groups=8, cross_attention_dim=768, attention_head_dim=2,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD2-like: per-block heads, linear projections, 1024-d text, three levels
    "sd2": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=1024, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


VAES = {
    "sd": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    # SD3/Flux-style: 16 channels, shift factor, no quant convs
    "sd3": dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
}
# diffusers' EncoderTiny/DecoderTiny need equal widths within each
TAESD = dict(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(8,) * 4,
             num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 1, 2, 1))


def write_tiny_t5_tokenizer(path, model_max_length=512):
    """A hand-written SentencePiece-style unigram vocabulary (deterministic, no sentencepiece),
    saved by transformers: ``tokenizer.json`` + ``tokenizer_config.json`` only."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-")
    words = ["▁a", "▁the", "▁of", "▁photo", "▁cat", "▁dog", "▁on", "▁in", "ing", "▁hello", "▁world", "er", "▁an"]
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -5.0) for c in chars]
             + [("▁" + c, -5.5) for c in chars[:26]] + [(w, -3.0 - 0.1 * i) for i, w in enumerate(words)])
    tok = transformers.T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    tok.save_pretrained(path)
    return path


def perflow_reference_velocity(prediction, eps, x, t, k=4):
    """The note's formulas for ONE element, in float64 with plain Python control flow."""
    starts = [1 - i / k for i in range(k)]
    ends = [1 - (i + 1) / k for i in range(k)]
    # the window test in float32, as PeRFlow runs it on float32 tensors: then t = 0.7501 is
    # "within 1e-4 above" 0.75 and starts the next window, as the note's example says
    f32 = np.float32
    w = next((i for i in range(k) if f32(ends[i]) < f32(t) - f32(1e-4)), k - 1)
    t_s, t_e = starts[w], ends[w]
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1 - betas).astype(np.float32).astype(np.float64)
    if prediction == "velocity":
        return eps
    c_x, c_eps = perflow_window_end(prediction, t, t_s, t_e, ac)
    return (c_x * x + c_eps * eps - x) / (t_e - t)


def perflow_window_end(prediction, t, t_s, t_e, ac):
    """PeRFlow's step(): the window end ``x_end = c_x x + c_eps out`` predicted from the model
    output at ``t`` in the window ``[t_s, t_e]``, with the training alphas ``ac`` (cumulative
    products, 1000 entries); returns ``(c_x, c_eps)``."""
    a_s, a_e = ac[int(t_s * 1000) - 1], ac[max(int(t_e * 1000) - 1, 0)]
    if prediction == "diff_eps":
        gamma = np.sqrt(a_s / a_e)
        lam_s, eta_s = 1 / gamma, -np.sqrt(1 - gamma**2) / gamma
    else:  # ddim_eps
        lam_s, eta_s = np.sqrt(a_e / a_s), np.sqrt(1 - a_e) - np.sqrt(a_e / a_s * (1 - a_s))
    denom = lam_s * (t - t_s) + (t_e - t)
    return lam_s * (t_e - t_s) / denom, eta_s * (t_e - t) / denom


def make_perflow_pipeline(root, scheduler: dict | None = None):
    """A tiny PeRFlow-style SD1.5 pipeline directory (UNet, VAE, CLIP, tokenizer), its scheduler
    config ``scheduler`` (default: PeRFlow diff_eps, 4 windows)."""
    randomize(diffusers.UNet2DConditionModel(**dict(UNETS["sd15"], cross_attention_dim=CLIP["hidden_size"])),
              1, std=0.1).save_pretrained(root / "unet")
    randomize(diffusers.AutoencoderKL(**VAES["sd"]), 2, std=0.1).save_pretrained(root / "vae")
    randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP)), 3, std=0.2).save_pretrained(
        root / "text_encoder")
    write_tiny_clip_vocab(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        scheduler or {"_class_name": "PeRFlowScheduler", "prediction_type": "diff_eps", "num_time_windows": 4}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["perflow", "PeRFlowScheduler"]}))
    return root


# SDXL-like UNets: a DownBlock2D level first, per-block heads, linear projections, the added
# "text_time" conditions (pooled text 24 wide + 6 time ids x 8 = 72), text states 80 wide
# (tiny CLIP-L's 32 + tiny CLIP-G's 48, side by side as SDXL's pipeline puts them)
# SDXL's block layout, transformer depths (1, 2, 2) and added conditions, one resnet per down
# block (the pipelines', exports' and LoRA tests': fewer blocks to compile and export);
# SDXL_UNETS["sdxl"] is the published layers_per_block=2
SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                 norm_num_groups=8, cross_attention_dim=80, attention_head_dim=(2, 4, 4),
                 transformer_layers_per_block=(1, 2, 2), use_linear_projection=True, upcast_attention=None,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=72)
SDXL_UNETS = {
    "sdxl": dict(SDXL_UNET, layers_per_block=2),
    # resnets per block, transformer layers per layer (SSD-1B/Vega style), the up blocks' given
    "sdxl_per_layer": dict(SDXL_UNET, layers_per_block=(1, 2, 2), transformer_layers_per_block=(1, (1, 2), (2, 1)),
                           reverse_transformer_layers_per_block=((1, 2, 1), (2, 1, 1), 1)),
}
# SDXL's second text encoder: CLIP-G-like, with a projection (its pooled, projected output is
# the UNet's text_embeds); GELU, as OpenCLIP bigG
CLIP_G = dict(CLIP, hidden_size=48, intermediate_size=50, num_attention_heads=6, projection_dim=24, hidden_act="gelu")


def sdxl_added_inputs(batch: int, text_dim: int = 24, seed: int = 0, height: int = 1024, width: int = 1024):
    """Random pooled text embeddings and SDXL's micro-conditioning time ids (original size, crop
    top-left, target size) varying per element."""
    rng = np.random.default_rng(seed)
    text_embeds = rng.standard_normal((batch, text_dim)).astype(np.float32)
    base = np.array([height, width, 0, 0, height, width], np.float32)
    time_ids = np.stack([base + np.array([64 * i, -32 * i, 8 * i, 16 * i, 0, 0], np.float32) for i in range(batch)])
    return text_embeds, time_ids


# ---------------------------------------------------------------------------------------------
# Servers under test (tests/test_serve*.py): the real `streamflow-jax serve` on a loopback port
# ---------------------------------------------------------------------------------------------


class ServerProcess:
    """``streamflow-jax serve ARGS --port 0`` in a subprocess; ``url`` once it printed its
    ``serving ... on http://127.0.0.1:PORT`` line (it has compiled by then)."""

    def __init__(self, args, *, startup_s: float = 300, env: dict | None = None):
        import subprocess
        import sys
        import threading

        self.stderr = tempfile.NamedTemporaryFile(prefix="serve-stderr-", suffix=".log", delete=False)
        self._stderr_text: str | None = None
        cmd = [sys.executable, "-m", "streamflow_jax.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list[str] = []
        self.url = None
        started = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if self.url is None and line.startswith("serving ") and " on http://" in line:
                    self.url = line.split(" on ", 1)[1].split()[0]
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(startup_s) or self.url is None:
            self.stop(timeout=10)
            raise RuntimeError(f"the server did not start: {self.log}")

    @property
    def log(self) -> str:
        """Its stdout and stderr so far (after ``stop``: all of them; the file is gone then)."""
        if self._stderr_text is None:
            with open(self.stderr.name, errors="replace") as f:
                return "".join(self.lines) + f.read()
        return "".join(self.lines) + self._stderr_text

    def stop(self, sig=None, timeout: float = 120) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if sig is None else sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stderr_text is None:  # keep the text, remove the file
            self.stderr.close()
            with open(self.stderr.name, errors="replace") as f:
                self._stderr_text = f.read()
            os.unlink(self.stderr.name)
        return self.proc.returncode


@pytest.fixture(scope="session")
def digits_server():
    """One digits server for the serve tests: 4 x 2 slots, at most 4 images waiting (12 outstanding)."""
    pytest.importorskip("uvicorn")
    server = ServerProcess(["--slots", "4", "--streams", "2", "--max-queue", "4", "--timeout", "60"])
    yield server
    server.stop()


@contextlib.contextmanager
def compiles():
    """The XLA compilations that happen inside it (one event each, persistent-cache hits
    included), as a list."""
    compiled = []

    def listener(event, duration, **kw):
        if event.endswith("backend_compile_duration"):
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def jaxpr_eqns(jaxpr):
    """Every equation of a jaxpr, and of the jaxprs inside its equations (jits, scans, custom
    rules), depth first."""
    import jax.extend

    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from jaxpr_eqns(sub)
