"""phibuild's own build file: every model in pyproject.toml's [tool.phibuild] through every installed backend.

`doit list` shows the targets, `doit` builds the default one, `doit quantize:<target>` builds one.
"""

from phibuild.tasks import (  # noqa: F401
    dodo_config,
    task_assemble,
    task_constraints,
    task_fidelity,
    task_gc,
    task_publish,
    task_quantize,
    task_release,
    task_report,
    task_reproduce,
    task_verify,
)

DOIT_CONFIG = dodo_config()
