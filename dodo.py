"""phibuild's own build file: every model in pyproject.toml's [tool.phibuild] through every backend, each in its
toolchain's environment.

`doit list` shows the targets, `doit` builds the default one, `doit quantize:<target>` builds one.
"""

from phibuild.tasks import (  # noqa: F401
    dodo_config,
    task_assemble,
    task_fidelity,
    task_gc,
    task_publish,
    task_quantize,
    task_release,
    task_report,
    task_reproduce,
    task_toolchains,
    task_verify,
)

DOIT_CONFIG = dodo_config()
