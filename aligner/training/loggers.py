"""The run's loggers (the plugins of role ``logger``, named in ``report_to``): start, fan out, drop a failing one.

Everything here runs on rank 0; on the other ranks a :class:`Loggers` holds no logger and does nothing.

- :meth:`Loggers.start` calls every logger's ``aligner_logger_start`` once, before any engine is built. A logger
  that cannot start (its library is missing, its server refuses) stops the run with :class:`LoggerError`.
- :meth:`Loggers.log` gives every logger the scalars of a step, :meth:`Loggers.final` the end of the run, and
  :meth:`Loggers.close` closes them once. A logger that raises in any of these (a network error, a full quota)
  is dropped for the rest of the run with one warning: training goes on, and the other loggers get every call.
- :meth:`Loggers.states` is what each logger asked to keep (its run id), stored in each checkpoint's marker, so
  that ``--resume`` continues the same run (``RunStart.resumed``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aligner.hookspecs import RunStart, RunSummary
from aligner.registry import ActivePlugins, PluginHookError

log = logging.getLogger("aligner")


class LoggerError(RuntimeError):
    """A logger could not start; the message names it, says why, and what to do."""


class Loggers:
    """The active loggers of a run on this rank (none but on rank 0), each called on its own."""

    def __init__(self, plugins: ActivePlugins, config: Any, rank: int) -> None:
        self.plugins, self.config, self.rank = plugins, config, rank
        self.active: list[str] = plugins.loggers if rank == 0 else []
        self.kept: dict[str, dict] = {}
        self.closed = False

    def start(self, run: RunStart, resumed: dict[str, dict] | None = None) -> None:
        """Open every logger's run; ``resumed``: each logger's kept state from the checkpoint being resumed (kept
        on for a logger this run does not report to, so that a later resume with it continues its run)."""
        self.kept = dict(resumed or {}) if self.rank == 0 else {}
        for name in self.active:
            start = RunStart(**{**run.__dict__, "resumed": (resumed or {}).get(name)})
            try:
                kept = self.plugins.call_one(name, "aligner_logger_start", run=start, config=self.config)
            except PluginHookError as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                self.close("failed")
                raise LoggerError(
                    f"logger '{name}' could not start: {type(cause).__name__}: {cause}. Fix that, or remove "
                    f"{name} from report_to (now {', '.join(self.plugins.loggers)})"
                ) from None
            if kept is not None:
                try:
                    self.kept[name] = json.loads(json.dumps(dict(kept)))
                except (TypeError, ValueError) as exc:
                    self.close("failed")
                    raise LoggerError(f"logger '{name}': aligner_logger_start must return a small JSON-serialisable "
                                      f"dict (it goes into every checkpoint's marker), got {kept!r}: {exc}") from None

    def states(self) -> dict[str, dict]:
        """Logger name -> what it asked to keep across a resume (for the checkpoint's marker)."""
        return dict(self.kept)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._each("aligner_log", step=step, metrics=dict(metrics))

    def final(self, summary: RunSummary) -> None:
        self._each("aligner_log_final", summary=summary)

    def wants_final(self) -> bool:
        """Whether some active logger takes the end of the run (the report's plots are drawn only then)."""
        return any(impl.plugin_name in self.active for impl in self.plugins.pm.hook.aligner_log_final.get_hookimpls())

    def close(self, status: str = "failed") -> None:
        """Close every logger once (later calls do nothing): ``finished``, ``stopped`` or ``failed``."""
        if self.closed:
            return
        self.closed = True
        self._each("aligner_logger_close", status=status)

    def _each(self, hook: str, **kwargs: Any) -> None:
        for name in list(self.active):
            try:
                self.plugins.call_one(name, hook, **kwargs)
            except PluginHookError as exc:
                self.active.remove(name)
                log.warning("logger '%s' failed (%s) and is dropped for the rest of this run; training and the "
                            "other loggers (%s) go on", name, exc, ", ".join(self.active) or "none")
