"""Where the library caches what it makes: exports, engines and compiled programs.

``cache_root()`` is ``$STREAMFLOW_JAX_CACHE`` (read at each use; a relative path is taken from
the working directory of that moment), else ``~/.cache/streamflow-jax``.
``enable_compilation_cache()`` turns on JAX's persistent compilation cache under it; the
library's entry points (the CLI, the server, the pipelines' loaders) call it, importing the
library does not.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

CACHE_ENV = "STREAMFLOW_JAX_CACHE"
XLA_CACHE_ENV = "STREAMFLOW_JAX_XLA_CACHE"  # "0" (off, none...) turns the persistent compilation cache off; a path moves it
_OFF = ("0", "false", "off", "no", "none", "disabled", "disable")
_DEFAULT = ("", "1", "true", "on", "yes")


def cache_root() -> Path:
    """Where exports, engines and compiled programs are cached: ``$STREAMFLOW_JAX_CACHE`` (``~``
    expanded), else ``~/.cache/streamflow-jax`` (read at each use, so the variable can be set at
    any time); always absolute, so that what is keyed or configured on it does not move with a
    later ``os.chdir``."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    return (Path(setting).expanduser() if setting else Path.home() / ".cache" / "streamflow-jax").absolute()


def _usable_directory(path: Path) -> str | None:
    """Why the compilation cache cannot live at ``path`` (made if missing), or None."""
    if path.exists() and not path.is_dir():
        return "a file, not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot be made ({e.strerror or e})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return None


_WARNED: set[tuple[str, str]] = set()  # unusable cache directories already warned about


def enable_compilation_cache() -> Path | None:
    """Turns on JAX's persistent compilation cache under ``cache_root()/xla``, so that a second
    process reuses the programs a first one compiled (all of them: the library sets
    ``jax_persistent_cache_min_compile_time_secs`` to 0 from JAX's 1 s). Left alone when
    ``$STREAMFLOW_JAX_XLA_CACHE`` is ``0`` or when the application set a cache directory itself;
    ``$STREAMFLOW_JAX_XLA_CACHE=DIR`` puts the cache in DIR instead (processes with their own
    ``$STREAMFLOW_JAX_CACHE`` can share one).

    The CLI, the server and the pipelines' loaders call it; ``import streamflow_jax`` does not.

    Returns:
        The cache directory in use, or None when off.
    """
    setting = os.environ.get(XLA_CACHE_ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    # absolute: JAX keeps the string, and would read a relative one against each later working directory
    path = cache_root() / "xla" if setting.lower() in _DEFAULT else Path(setting).expanduser().absolute()
    why = _usable_directory(path)
    if why is not None:  # JAX would warn once per program, naming neither variable; the cache stays off
        if (str(path), why) in _WARNED:  # once a process (the CLI and a pipeline's loader both ask)
            return None
        _WARNED.add((str(path), why))
        warnings.warn(f"the compilation cache stays off: {path}: {why} (set ${XLA_CACHE_ENV} to a writable "
                      f"directory, or to 0; or ${CACHE_ENV})", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # every program, not only those over 1 s: a pipeline compiles many sub-second ones
    # (scan, admission, decode), which together are most of a first call
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
