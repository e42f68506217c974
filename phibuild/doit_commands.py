"""doit's ``run`` and ``info`` commands, as phibuild installs them (entry points ``doit.COMMAND``): the same
commands, except that a mistyped task name is answered with the nearest names, and that ``doit info`` shows
why a target is stale without doit's ``(args=[], kwargs={})`` after each reason. They behave as doit's own in any
other project of the environment."""

from __future__ import annotations

import difflib

from doit.cmd_info import Info as DoitInfo
from doit.cmd_run import Run as DoitRun
from doit.exceptions import InvalidCommand


class UnknownTask(InvalidCommand):
    """doit's "invalid parameter" error, with the names the user may have meant."""

    def __init__(self, not_found: str, names: list[str]):
        super().__init__(not_found=not_found)
        self.close = difflib.get_close_matches(not_found, names, n=3, cutoff=0.6)

    def __str__(self) -> str:
        text = super().__str__().rstrip("\n")
        return text + (f"\nDid you mean: {', '.join(self.close)}?" if self.close else "")


class Run(DoitRun):
    def execute(self, params, args):
        try:
            return super().execute(params, args)
        except InvalidCommand as exc:
            if exc.not_found is None or isinstance(exc, UnknownTask):
                raise
            raise UnknownTask(exc.not_found, [task.name for task in self.task_list]) from None


class Info(DoitInfo):
    def _execute(self, pos_args, hide_status=False):
        names = [task.name for task in self.task_list]
        if len(pos_args) == 1 and pos_args[0] not in names:
            raise UnknownTask(pos_args[0], names)
        return super()._execute(pos_args, hide_status=hide_status)

    @staticmethod
    def get_reasons(reasons):
        return DoitInfo.get_reasons(reasons).replace(" (args=[], kwargs={})", "")
