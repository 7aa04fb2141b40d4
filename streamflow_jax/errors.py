"""The library's error types, in a module that imports nothing (so any layer can raise them).

All are ``ValueError`` subclasses: each one means "this input does not fit", and the CLI turns
each into one line on stderr and exit status 1.
"""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted or loaded; the message names the file and the key."""


class ConfigError(ValueError):
    """A pipeline configuration that does not fit (``scheduler_config.json``, ``model_index.json``,
    an override of one); the message names the file and the field."""


class RequestError(ValueError):
    """Why one stream-engine request failed; the engine goes on with the others."""


class ExportError(ValueError):
    """An export directory or graph that cannot be made or used (missing, corrupt, stale)."""


class ShapeError(ValueError):
    """Inputs that do not fit an exported graph's spec; names the input, the axis and the range."""


def check_count(name: str, value, least: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float) >= ``least``, else a
    ValueError naming ``name``: the one rule for counts and sizes given to the library."""
    import numpy as np  # here: this module is imported by everything, numpy only when used

    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def is_real_dtype(dtype) -> bool:
    """Whether ``dtype`` holds real numbers: an integer or floating type (bfloat16, float8 and the
    other ml_dtypes floats included: numpy calls their kind ``V``); not bool, complex or text."""
    import jax.numpy as jnp  # here: this module imports nothing at load

    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))


def is_real_number(value) -> bool:
    """Whether ``value`` is one real number: a Python int or float, or a 0-d numpy, ml_dtypes or
    JAX scalar of a real dtype (a bfloat16 scalar included); not a bool."""
    import numpy as np

    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | float):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and np.ndim(value) == 0 and is_real_dtype(dtype)
