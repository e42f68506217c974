"""phibuild's own build file: every model in pyproject.toml's [tool.phibuild] through every installed backend.

`doit list` shows the targets, `doit` builds the default one, `doit quantize:<target>` builds one.
"""

from phibuild.tasks import dodo_config, task_quantize  # noqa: F401

DOIT_CONFIG = dodo_config()
