"""The runtime's isolation promises, each checked in a fresh interpreter:

- "The library never imports torch or diffusers" (README), at run time and not only at import:
  converting, loading and sampling tiny diffusers pipelines and ``streamflow-jax generate``, in
  a process where torch, diffusers, transformers, peft and accelerate cannot be imported, give
  the latents of the references the pipeline tests use (diffusers' own SD3 pipeline, the
  independent PeRFlow loop of ``test_sd15_pipeline``, diffusers' digits loop of ``test_digits``).
- "Importing it changes no global state" (design.md): JAX's whole configuration, the warning
  filters, the loggers, the environment, signal handlers, hooks and numpy's settings are the
  same before and after importing the package, its public names and its entry modules.
- "Compiled programs are cached" (README): an application's own ``jax_compilation_cache_dir``
  stays its own; every spelling the README gives for "off" keeps the cache off, through the
  entry points too (``test_cli.py::test_xla_cache_setting`` checks 0, off and none through
  ``enable_compilation_cache`` only).

The scripts run as files (``python SCRIPT``), never ``-c`` from the repository root: the
package is then whatever ``sys.path`` resolves (the installed one, or a copy named first on
``$PYTHONPATH``, which is how these tests were checked against broken copies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

BLOCKED = ("torch", "diffusers", "transformers", "peft", "accelerate")

# Installed before anything else: every import of a blocked top-level name (or below it) fails
# with ModuleNotFoundError, and who asked (the first frame outside importlib) is recorded, so
# that an attempt caught by a ``try: import torch / except ImportError`` is seen too.
BLOCKER = textwrap.dedent('''
    import json, sys
    BLOCKED = {blocked!r}
    ATTEMPTS = []
    assert not [m for m in sys.modules if m.partition(".")[0] in BLOCKED], "loaded before the blocker"

    def _importer():
        f = sys._getframe(2)
        while f is not None and (f.f_code.co_filename.startswith("<frozen") or "importlib" in f.f_code.co_filename):
            f = f.f_back
        return "?" if f is None else f"{{f.f_code.co_filename}}:{{f.f_lineno}}"

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                ATTEMPTS.append([name, _importer()])
                raise ModuleNotFoundError(f"blocked by the test: {{name}}", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())

    def report(path):
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED and sys.modules[m] is not None)
        with open(path, "w") as f:
            json.dump({{"loaded": loaded, "attempts": ATTEMPTS}}, f)
''').format(blocked=BLOCKED)

RUNTIME_SCRIPT = BLOCKER + textwrap.dedent('''
    import numpy as np
    import streamflow_jax as sf
    from streamflow_jax.cli import main as cli

    args = json.loads(sys.argv[1])
    try:
        for name, case in args["pipelines"].items():
            noise = np.load(case["noise"])
            converted = case["dir"] + "-converted"
            sf.convert(case["dir"], converted, progress=False)
            for source, tag in ((case["dir"], "diffusers"), (converted, "converted")):
                pipe = sf.Pipeline.from_diffusers(source, **case["load"])
                assert type(pipe).__name__ == case["class"], (source, type(pipe))
                run = dict(steps=case["steps"], guidance_scale=case["guidance"], negative_prompt=case["negative"],
                           output_type="latent", progress=False)
                np.save(f"{args['out']}/{name}-{tag}.npy", np.asarray(pipe(case["prompts"], noise=noise, **run)))
                np.save(f"{args['out']}/{name}-{tag}-seed.npy", np.asarray(pipe(case["prompts"], seed=3, **run)))
        assert cli(["generate", "--per-digit", "1", "--steps", str(args["digit_steps"]), "-q",
                    "--out", args["out"] + "/digits.png"]) == 0
    finally:
        report(args["out"] + "/modules.json")
''')


def _run(script: str, tmp_path, *args, env=None, timeout=600):
    """``python SCRIPT ARGS`` in ``tmp_path`` with this process's environment (conftest's JAX
    platform and shared XLA cache, the test's $STREAMFLOW_JAX_CACHE) updated by ``env``, where
    None removes a variable."""
    path = tmp_path / "script.py"
    path.write_text(script)
    environ = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(path), *args], env={k: v for k, v in environ.items() if v is not None},
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_blocker_refuses_and_records_the_blocked_names(tmp_path):
    """The blocker itself: a caught ``import torch`` is recorded with its importer, nothing of it
    is loaded, and an unblocked name still imports."""
    script = BLOCKER + textwrap.dedent('''
        for name in ("torch", "diffusers.models", "peft"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                pass
            else:
                raise SystemExit(f"{name} imported")
        import numpy, safetensors.numpy  # noqa: E401
        report(sys.argv[1])
    ''')
    done = _run(script, tmp_path, str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["loaded"] == []
    assert [a[0] for a in got["attempts"]] == ["torch", "diffusers", "peft"]
    assert all(a[1].startswith(str(tmp_path / "script.py")) for a in got["attempts"]), got


def test_runtime_never_imports_torch_or_diffusers(tmp_path):
    """Convert, load (diffusers and converted directories), sample to latents, and the CLI's
    ``generate``, with torch, diffusers, transformers, peft and accelerate unimportable: every
    latent is the reference's (diffusers' SD3 pipeline; the independent PeRFlow loop), the
    digits grid is diffusers' digits loop's, and nothing blocked was loaded or even asked for
    by the library (an attempt inside ``streamflow_jax`` fails the test though it was caught)."""
    import jax
    from PIL import Image
    from test_digits import GUIDANCE, diffusers_digits
    from test_prompt_pipelines import PROMPTS as SD3_PROMPTS
    from test_prompt_pipelines import make_sd3_pipeline, sd3_reference
    from test_sd15_pipeline import NEGATIVE, PROMPTS, TOL, Reference, make_pipeline, perflow_scheduler

    from streamflow_jax.pipelines import image_grid

    (tmp_path / "sd3").mkdir()
    sd3_ref = make_sd3_pipeline(tmp_path / "sd3")  # -> tmp_path/sd3/pipe, with T5
    perflow_dir = make_pipeline(tmp_path / "perflow", perflow_scheduler())
    sd3_noise = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype(np.float32)
    perflow_noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    np.save(tmp_path / "sd3-noise.npy", sd3_noise)
    np.save(tmp_path / "perflow-noise.npy", perflow_noise)
    out = tmp_path / "out"
    out.mkdir()
    args = {"out": str(out), "digit_steps": 4, "pipelines": {
        "sd3": {"dir": str(tmp_path / "sd3" / "pipe"), "noise": str(tmp_path / "sd3-noise.npy"),
                "load": {"max_sequence_length": 12}, "class": "SD3Pipeline", "prompts": SD3_PROMPTS,
                "steps": 3, "guidance": 5.0, "negative": ""},
        "perflow": {"dir": str(perflow_dir), "noise": str(tmp_path / "perflow-noise.npy"), "load": {},
                    "class": "PeRFlowPipeline", "prompts": PROMPTS, "steps": 4, "guidance": 3.0,
                    "negative": NEGATIVE}}}
    done = _run(RUNTIME_SCRIPT, tmp_path, json.dumps(args))
    modules = json.loads((out / "modules.json").read_text()) if (out / "modules.json").exists() else None
    assert done.returncode == 0, (modules, done.stderr[-5000:])
    assert modules["loaded"] == [], modules
    # the library's files: the package (wherever the subprocess found it) and convert/ behind
    # its converters link; attempts by third-party packages would be listed, not failed
    package = os.path.dirname(os.path.abspath(__import__("streamflow_jax").__file__))
    ours = [a for a in modules["attempts"] if f"{os.sep}streamflow_jax{os.sep}" in a[1]
            or a[1].startswith(os.path.realpath(os.path.join(package, "converters")) + os.sep)]
    assert ours == [], ours

    # the references, in this (torch) process, from the same inputs; seed=3's noise is
    # jax.random.normal(key(3)) (sampling.seeded_noise's rule, written out here)
    def seeded(shape):
        return np.array(jax.random.normal(jax.random.key(3), shape, np.float32))

    for noise, suffix in ((sd3_noise, ""), (seeded(sd3_noise.shape), "-seed")):
        want = sd3_reference(sd3_ref, SD3_PROMPTS, noise, 3, 5.0, 12, "latent")
        for tag in ("diffusers", "converted"):
            got = np.load(out / f"sd3-{tag}{suffix}.npy")
            assert got.shape == want.shape == (2, 8, 8, 16)
            assert _rel(got, want) <= 3e-5, (tag, suffix, _rel(got, want))  # test_prompt_pipelines' bound
    reference = Reference(perflow_dir)
    for noise, suffix in ((perflow_noise, ""), (seeded(perflow_noise.shape), "-seed")):
        want = reference.latents(PROMPTS, noise, 4, guidance=3.0, negative=NEGATIVE)
        for tag in ("diffusers", "converted"):
            got = np.load(out / f"perflow-{tag}{suffix}.npy")
            assert got.shape == want.shape == (2, 8, 8, 4)
            assert _rel(got, want) <= TOL, (tag, suffix, _rel(got, want))
    # generate: labels 0..9, seed 0 (its noise by the same rule); test_digits' diffusers loop
    noise = np.array(jax.random.normal(jax.random.key(0), (10, 16, 16, 1), np.float32))
    digits = diffusers_digits(np.arange(10), 4, GUIDANCE, noise)
    grid = np.asarray(Image.open(out / "digits.png"), np.float32)
    np.testing.assert_allclose(grid, np.asarray(image_grid(digits, rows=10), np.float32), atol=1)


# ---------------------------------------------------------------------------------------------
# Importing changes no global state
# ---------------------------------------------------------------------------------------------

STATE_SCRIPT = textwrap.dedent('''
    import faulthandler, importlib, json, logging, os, signal, sys, threading, warnings
    import numpy as np
    import jax

    DEFAULT_LOGGER = [logging.NOTSET, False, True, [], []]

    def snapshot():
        holders = jax.config._value_holders  # every option, read through its holder and through .values
        config = {k: repr(h.value) for k, h in holders.items()}
        config.update({"values." + k: repr(v) for k, v in jax.config.values.items()})
        loggers = {}  # a placeholder (a parent no one asked for yet) counts as a logger left as made
        for name, lg in list(logging.root.manager.loggerDict.items()):
            loggers[name] = DEFAULT_LOGGER if isinstance(lg, logging.PlaceHolder) else [
                lg.level, lg.disabled, lg.propagate, [repr(h) for h in lg.handlers], [repr(f) for f in lg.filters]]
        signals = {}
        for s in signal.valid_signals():
            try:
                signals[str(s)] = repr(signal.getsignal(s))
            except (OSError, ValueError):
                pass
        return {
            "jax.config": config,
            "warnings.filters": [repr(f) for f in warnings.filters],
            "warnings.showwarning": repr(warnings.showwarning),
            "root logger": [logging.root.level, [repr(f) for f in logging.root.filters]],
            "root logger handlers": [repr(h) for h in logging.root.handlers],
            "logging.disable": logging.root.manager.disable,
            "logging classes": [repr(logging.getLoggerClass()), repr(logging.getLogRecordFactory())],
            "loggers": loggers,
            "os.environ": dict(os.environ),
            "cwd": os.getcwd(),
            "signals": signals,
            "hooks": [repr(sys.excepthook), repr(sys.displayhook), repr(threading.excepthook),
                      repr(sys.unraisablehook), faulthandler.is_enabled(), sys.getrecursionlimit(),
                      sys.getswitchinterval(), repr(sys.getprofile()), repr(sys.gettrace())],
            "numpy": [np.geterr(), repr(np.get_printoptions())],
        }

    def diff(before, after):
        changed = {}
        for key, b in before.items():
            a = after[key]
            if key in ("jax.config", "loggers"):  # a new option is no change, nor a new logger left as made
                d = {k: [b[k], a.get(k, "<gone>")] for k in b if a.get(k, "<gone>") != b[k]}
                if key == "loggers":
                    d.update({k: ["<new>", v] for k, v in a.items()
                              if k not in b and v != DEFAULT_LOGGER and not k.startswith("streamflow_jax")})
                if d:
                    changed[key] = d
            elif a != b:
                changed[key] = [b, a]
        return changed

    modules = sys.argv[2:]
    before = snapshot()
    import streamflow_jax as sf
    for name in sf.__all__:  # the lazy public names: their modules are imported
        getattr(sf, name)
    for name in modules:
        importlib.import_module(name)
    after = snapshot()
    with open(sys.argv[1], "w") as f:
        json.dump(diff(before, after), f, indent=1, default=repr)
''')

ENTRY_MODULES = ["streamflow_jax.pipelines", "streamflow_jax.backends", "streamflow_jax.cli",
                 "streamflow_jax.backends.onnxruntime", "streamflow_jax.backends.tensorrt"]


def _state_changes(tmp_path, modules):
    done = _run(STATE_SCRIPT, tmp_path, str(tmp_path / "diff.json"), *modules, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "diff.json").read_text())


def test_importing_the_library_and_its_entry_modules_changes_no_global_state(tmp_path):
    """Every JAX option (not only the cache's two), the warning filters, every logger (level,
    handlers, filters, propagation; one made by the import as made, unless it is the library's
    own), the environment, signal handlers,
    the interpreter's hooks and numpy's error and print settings are unchanged by importing the
    package, every public name, the pipelines, the backends, the CLI and the server. (The root
    logger's handlers: the next test.)"""
    import importlib.util

    modules = ENTRY_MODULES + (["streamflow_jax.serve"] if importlib.util.find_spec("starlette") else [])
    changes = _state_changes(tmp_path, modules)
    changes.pop("root logger handlers", None)
    assert changes == {}, json.dumps(changes, indent=1)[:5000]


def test_importing_the_pipelines_adds_no_root_logging_handler(tmp_path):
    """An application that configures logging after importing the library
    (``logging.basicConfig(level=logging.INFO)``) must still be able to: the root logger keeps
    its handlers (none, in a fresh interpreter)."""
    changes = _state_changes(tmp_path, ["streamflow_jax.pipelines"])
    assert "root logger handlers" not in changes, changes["root logger handlers"]
    # nor its first use of orbax (imported then): a conversion written and read back
    script = ("import logging, sys\nimport streamflow_jax as sf\nfrom streamflow_jax.pipelines import DIGITS_DIR\n"
              "sf.convert(DIGITS_DIR / 'transformer', sys.argv[1], progress=False)\nsf.load(sys.argv[1])\n"
              "logging.basicConfig(level=logging.INFO, format='APP %(message)s')\n"
              "logging.getLogger('app').info('hello')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "converted")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "APP hello" in done.stderr, done.stderr[-2000:]  # the application's configuration took effect


# ---------------------------------------------------------------------------------------------
# The persistent compilation cache
# ---------------------------------------------------------------------------------------------

CACHE_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import jax
    import jax.numpy as jnp

    given = json.loads(sys.argv[1])
    if given.get("app_dir_by_config"):
        jax.config.update("jax_compilation_cache_dir", given["app_dir_by_config"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e-6)
    import streamflow_jax as sf
    from streamflow_jax.pipelines import DIGITS_DIR

    seen = []
    for setting in given["settings"]:
        if setting is None:
            os.environ.pop("STREAMFLOW_JAX_XLA_CACHE", None)
        else:
            os.environ["STREAMFLOW_JAX_XLA_CACHE"] = setting
        returned = sf.enable_compilation_cache()
        pipe = sf.Pipeline.from_diffusers(DIGITS_DIR)  # an entry point: it enables the cache itself
        images = pipe([1, 7], steps=1, progress=False)  # compiles (and would write to a cache)
        assert images.shape == (2, 16, 16)
        jax.jit(lambda x: jnp.sin(x) * len(setting or "x"))(jnp.ones(3)).block_until_ready()
        seen.append({"setting": setting, "returned": None if returned is None else str(returned),
                     "dir": jax.config.jax_compilation_cache_dir,
                     "min_s": jax.config.jax_persistent_cache_min_compile_time_secs,
                     "made": sorted(str(p) for root in (os.environ["STREAMFLOW_JAX_CACHE"], os.environ["HOME"])
                                    for p in __import__("pathlib").Path(root).rglob("*"))})
    print(json.dumps(seen))
''')


def _cache_run(tmp_path, settings, env_extra=None, app_dir_by_config=None):
    env = {"STREAMFLOW_JAX_CACHE": str(tmp_path / "root"), "HOME": str(tmp_path / "home"), **(env_extra or {})}
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.setdefault(name, None)
    given = {"settings": settings, "app_dir_by_config": app_dir_by_config}
    done = _run(CACHE_SCRIPT, tmp_path, json.dumps(given), env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _entries(path):
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


@pytest.mark.parametrize("how", ["config", "environment"])
def test_an_applications_own_cache_directory_is_kept(tmp_path, how):
    """An application that set ``jax_compilation_cache_dir`` itself (``jax.config.update``, or
    JAX's ``$JAX_COMPILATION_CACHE_DIR``) keeps it, and its minimum compile time, through
    ``sf.enable_compilation_cache()`` and ``sf.Pipeline.from_diffusers``, whatever
    ``$STREAMFLOW_JAX_XLA_CACHE`` says short of off; the programs go to its directory and
    nothing is made under ``$STREAMFLOW_JAX_CACHE``."""
    app = tmp_path / "app-cache"
    elsewhere = tmp_path / "elsewhere"
    settings = [None, "on", str(elsewhere)]
    # the application's minimum: not the library's 0 (to tell them apart), small enough that
    # these programs are written
    min_s = 1e-6
    if how == "config":
        seen, _ = _cache_run(tmp_path, settings, app_dir_by_config=str(app))
    else:
        seen, _ = _cache_run(tmp_path, settings, env_extra={"JAX_COMPILATION_CACHE_DIR": str(app),
                                                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1e-6"})
    for step in seen:
        assert step["dir"] == str(app) and step["returned"] == str(app), step
        assert step["min_s"] == min_s, step
    assert _entries(app), "the application's directory holds no program"
    assert not (tmp_path / "root" / "xla").exists() and not elsewhere.exists()
    assert not (tmp_path / "home" / ".cache").exists()


def test_every_off_spelling_keeps_the_cache_off_through_the_entry_points(tmp_path):
    """``STREAMFLOW_JAX_XLA_CACHE`` = 0, false, off, no, none, disabled (README's list; test_cli
    checks 0, off and none through ``enable_compilation_cache`` alone): None from
    ``enable_compilation_cache``, and after ``Pipeline.from_diffusers`` and two compiles JAX's
    cache directory is still unset, its minimum compile time JAX's, and nothing is written under
    ``$STREAMFLOW_JAX_CACHE`` or ``~/.cache``. Then unset: the default turns it on there (the
    same process: the settings above were really read)."""
    spellings = ["0", "false", "off", "no", "none", "disable", "disabled"]
    seen, stderr = _cache_run(tmp_path, [*spellings, None])
    assert [s["setting"] for s in seen] == [*spellings, None]
    for step in seen[:-1]:
        assert step["returned"] is None and step["dir"] in (None, ""), step
        assert step["made"] == [], step  # nothing under $STREAMFLOW_JAX_CACHE or ~
    assert "compilation cache stays off" not in stderr
    assert all(s["min_s"] == 1.0 for s in seen[:-1]), seen  # JAX's default, untouched
    last = seen[-1]
    assert last["dir"] == last["returned"] == str(tmp_path / "root" / "xla") and last["min_s"] == 0.0, last
