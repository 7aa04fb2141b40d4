from streamflow_jax.cli import run

run()  # as the console script: after Ctrl-C the process ends without the interpreter's teardown
