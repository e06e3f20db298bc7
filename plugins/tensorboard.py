"""TensorBoard: the default logger (``report_to: [tensorboard]``), rank 0 writing ``output_dir/tensorboard``.

Every scalar of :func:`aligner.hookspecs.aligner_log` becomes ``add_scalar(tag, value, step)``, tags sorted,
and the writer flushes at every logged step, so TensorBoard is live and a killed run loses none of the
metrics it had logged. ``aligner-report`` and the plots that other loggers receive read these event files.

A resumed run adds a new event file to the same folder, starting with a purge marker at the first step
after the checkpoint (``purge_step``): TensorBoard then hides what the interrupted run had logged from that
step on, so each step shows once, with the resumed run's values.

No options; it keeps nothing across a resume (the folder is the run).
"""

from __future__ import annotations

from aligner.hookspecs import PluginInfo, RunStart, hookimpl

NAME = "tensorboard"


class TensorBoard:
    """One ``SummaryWriter`` per run, opened by ``aligner_logger_start``."""

    def __init__(self) -> None:
        self.writer = None

    @hookimpl
    def aligner_plugin_info(self) -> PluginInfo:
        return PluginInfo(name=NAME, role="logger", summary="TensorBoard event files in output_dir/tensorboard (the default)")

    @hookimpl
    def aligner_logger_start(self, run: RunStart) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.output_dir / "tensorboard"), purge_step=run.start_step + 1)

    @hookimpl
    def aligner_log(self, step: int, metrics: dict[str, float]) -> None:
        for tag, value in sorted(metrics.items()):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    @hookimpl
    def aligner_logger_close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


plugin = TensorBoard()
