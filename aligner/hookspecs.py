"""The whole plugin contract of aligner, in one file.

A plugin is a module (or an instance) whose functions are marked with
:data:`hookimpl` and named after the hooks below. Hooks are called by keyword,
so an implementation may take any subset of a hook's arguments, and a new
argument added here breaks no plugin.

Every plugin implements :func:`aligner_plugin_info`, and usually
:func:`aligner_config_section` and :func:`aligner_required_models`. Then, by role:

- ``loss`` (at least one per run; :data:`aligner.config.DEFAULT_LOSS` when none is named): :func:`aligner_loss`.
  Each loss's options inherit :class:`LossConfig`, whose ``weight`` the core
  multiplies the loss's term by; ``train/loss`` is the weighted sum of the loss
  terms plus the constraints' terms. A loss that takes unpaired data or needs
  mismatched-pair log-probs (KTO) says so in :func:`aligner_required_inputs`.
- ``constraint`` (any number): :func:`aligner_constraint`.
- ``reference_update`` (at most one): :func:`aligner_after_optimizer_step`.
- ``logger`` (any number, named in the config's ``report_to``, not in ``--plugins``;
  :data:`aligner.config.DEFAULT_LOGGERS` when the config names none): :func:`aligner_log`, and
  usually :func:`aligner_logger_start`, :func:`aligner_log_final` and
  :func:`aligner_logger_close`. Every logger hook is called on rank 0 only. A
  logger that raises in :func:`aligner_log`, :func:`aligner_log_final` or
  :func:`aligner_logger_close` is dropped for the rest of the run with a warning
  (training and the other loggers go on); one that raises in
  :func:`aligner_logger_start` stops the run before any engine is built.

A plugin with state that must survive a resume implements
:func:`aligner_state_dict` and :func:`aligner_load_state_dict` (small state,
saved once), or :func:`aligner_save_checkpoint` and
:func:`aligner_load_checkpoint` (state that lives in every rank's shards, such
as a moved reference model).

Every hook is called the same way (:meth:`aligner.registry.ActivePlugins.call_each`):
each implementation by keyword, in ``--plugins`` order; mark an implementation
``@hookimpl(tryfirst=True)`` or ``@hookimpl(trylast=True)`` to run it before
or after all others (a plugin that logs the reference after a trust-region
update uses ``trylast``). Only :func:`aligner_model_path` is ``firstresult``:
the first non-None answer in that order wins. Hook wrappers
(``hookwrapper=True``/``wrapper=True``) are refused when a plugin is activated,
and so is a plugin that lacks its role's hook (:data:`REQUIRED_HOOKS`).

Built-in plugins are registered through the same entry-point group
(``aligner.plugins``) as third-party ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from aligner.config import RunConfig

#: Major version of this contract. A plugin whose ``PluginInfo.api_version``
#: has a different major number is refused when it is activated.
API_VERSION = "1.0"

PROJECT = "aligner"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

ROLES = ("loss", "constraint", "reference_update", "logger")
#: The hook each role must implement; a plugin without it is refused when it is activated.
REQUIRED_HOOKS = {"loss": "aligner_loss", "constraint": "aligner_constraint",
                  "reference_update": "aligner_after_optimizer_step", "logger": "aligner_log"}
MODELS = ("reference", "anchor")
#: Optional inputs a plugin may ask for in :func:`aligner_required_inputs`:
#: ``"unpaired"``: it can train and evaluate on unpaired data (rows ``prompt``,
#: ``completion``, ``label``), i.e. it handles :class:`StepInputs` with
#: ``paired=False``; an unpaired dataset is refused unless the loss asks for this.
#: ``"kl_pairs"``: it needs :attr:`StepInputs.kl_policy` and
#: :attr:`StepInputs.kl_reference`, the log-probs of mismatched prompt/completion
#: pairs (one extra no-grad forward of the policy and of the reference per micro-batch).
INPUTS = ("unpaired", "kl_pairs")


@dataclass(frozen=True)
class PluginInfo:
    """What a plugin is: its name, its role (one of :data:`ROLES`) and a one-line summary."""

    name: str
    role: str
    summary: str
    api_version: str = API_VERSION


@dataclass
class SequenceLogps:
    """Summed log-probabilities of the response tokens, one value per example.

    ``chosen`` and ``rejected`` have shape ``(B,)``, B being the number of
    preference pairs in the micro-batch. In an unpaired batch
    (``StepInputs.paired`` is False) ``chosen`` holds the desirable completions
    and ``rejected`` the undesirable ones, and their lengths may differ (either
    may be empty).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor


@dataclass
class StepInputs:
    """Everything a loss or constraint hook sees for one micro-batch.

    ``policy`` carries gradients; ``reference`` and ``anchor`` do not, and are
    ``None`` unless some active plugin asked for that model in
    :func:`aligner_required_models`. Token counts are the number of response
    tokens scored (after truncation), shape ``(B,)``.

    ``paired`` is False for a batch of unpaired rows (``prompt``, ``completion``,
    ``label``): ``chosen``/``chosen_tokens`` then hold the desirable completions,
    ``rejected``/``rejected_tokens`` the undesirable ones, and ``example_ids``
    lists the desirable rows' ids, then the undesirable rows' (one per
    completion; for paired batches one per pair). Only a loss that asked for
    ``"unpaired"`` in :func:`aligner_required_inputs` is given such batches.

    ``kl_policy`` and ``kl_reference`` (shape ``(N,)``, no gradient) are set
    only when some plugin asked for ``"kl_pairs"``: the summed log-probs of the
    batch's completions each scored after another row's prompt (row i's prompt
    with row i−1's completion in the batch's example order, as TRL's KTOTrainer
    builds its KL batch), N being the number of completions in the batch (2B for pairs).
    """

    policy: SequenceLogps
    reference: SequenceLogps | None
    anchor: SequenceLogps | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    example_ids: list[str] = field(default_factory=list)
    paired: bool = True
    kl_policy: torch.Tensor | None = None
    kl_reference: torch.Tensor | None = None


@dataclass(frozen=True)
class DatasetSummary:
    """What the training set holds, for :func:`aligner_train_data`: its name, whether its rows
    are pairs, and its desirable/undesirable completions (for pairs: chosen/rejected, one each)."""

    label: str
    paired: bool
    n_rows: int
    n_desirable: int
    n_undesirable: int


def check_interval(key: str, value: float, interval: str, why: str = "") -> None:
    """Raise ``ValueError`` unless option ``key``'s ``value`` lies in ``interval``, written as in mathematics:
    ``"(0, inf)"``, ``"[0, 0.5)"``, ``"(0, 1]"``. NaN lies in none. The one wording of every plugin option's range
    check: ``dpo.beta must be > 0, got 0``, ``dpo.label_smoothing must be in [0, 0.5), got 0.7``; ``why``, when
    given, follows the range in parentheses. Call it from an option dataclass's ``__post_init__``."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    if not (above and below):
        bound = f"{'>' if interval[0] == '(' else '>='} {low:g}" if high == float("inf") else f"in {interval}"
        raise ValueError(f"{key} must be {bound}{f' ({why})' if why else ''}, got {value}")


@dataclass
class LossConfig:
    """The options every loss plugin has; a loss plugin's config dataclass inherits this one.

    ``weight`` (default 1, the one place that default lives) multiplies the
    loss's term in ``train/loss`` (TRL's ``loss_weights``), e.g. MPO is
    ``--plugins dpo,bco_pair,sft --set dpo.weight=0.8 --set bco_pair.weight=0.2``.
    A subclass with its own ``__post_init__`` calls ``super().__post_init__()``.
    """

    weight: float = 1.0  #: this loss's weight in ``train/loss`` (>= 0)

    def __post_init__(self) -> None:
        if not self.weight >= 0 or self.weight == float("inf"):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")


@dataclass
class LossOutput:
    """A scalar loss term and the metrics to log beside it (TensorBoard tag -> scalar tensor)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def pairwise(cls, losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> LossOutput:
        """A reference-free pairwise loss's output: the mean of its per-pair ``losses`` (B,), and TRL's reward
        metrics from its own (B,) rewards: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (means)
        and ``rewards/accuracies`` (share of pairs with chosen > rejected).

        When the run has a reference model the core logs ``rewards/*`` itself, from the DPO-form implicit
        reward (:mod:`aligner.training.rewards`), and a loss's own ``rewards/*`` tags are dropped: a loss with a
        reference returns ``LossOutput(losses.mean())`` and logs any other reward under its own prefix."""
        chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
        return cls(loss=losses.mean(), metrics={
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
        })


@dataclass(frozen=True)
class RunStart:
    """What every logger receives once, when the run starts (:func:`aligner_logger_start`).

    ``config`` is the resolved run config as plain data (what ``output_dir/config.json`` holds), ``plan``
    the model plan (what ``output_dir/plan.json`` holds under ``models`` and ``inputs``), ``plugins`` each
    active plugin's ``name -> distribution-version`` (loggers included). ``start_step`` is 0 for a new run
    and the checkpoint's step on ``--resume``; ``resumed`` is then what this logger returned from
    :func:`aligner_logger_start` in the run that wrote that checkpoint (e.g. ``{"run_id": ...}``), so
    that the resumed run continues the same run, or ``None`` (a new run, or a checkpoint written without
    this logger).
    """

    output_dir: Path
    config: dict[str, Any]
    plan: dict[str, Any]
    plugins: dict[str, str]
    start_step: int = 0
    resumed: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunSummary:
    """What every logger receives once, at the end of a run that trained to ``train.max_steps``
    (:func:`aligner_log_final`).

    ``metrics``: the final metrics (``output_dir/final_metrics.json``: the last step's scalars and the
    last evaluation's ``eval/...``), ``step`` the last step. ``images``: the PNG plots of
    ``aligner-report`` (``output_dir/report/*.png``), empty when no TensorBoard event files were written
    or matplotlib is missing. ``final_dir``: the exported model (a full checkpoint, or a PEFT adapter
    under ``model.lora``), with its model card ``README.md``; ``merged_dir``: the merged model of
    ``export.merge_lora``, else ``None``. ``hub_url``: where ``export.push_to_hub`` uploaded it, ``None``
    when it was not pushed (or the push failed: ``hub_error`` then says why).
    """

    step: int
    metrics: dict[str, float]
    images: list[Path]
    final_dir: Path
    merged_dir: Path | None = None
    hub_url: str | None = None
    hub_error: str | None = None


@dataclass
class Engines:
    """The DeepSpeed engines of a run. ``reference`` and ``anchor`` may be ``None``,
    or the same object when no reference-update plugin is active. A model whose
    log-probs come from the static cache (``train.cache_static_logps``: the anchor,
    and the reference while nothing moves it) has no engine during the steps. Under ``model.lora`` a reference or
    anchor that is the initial policy is an :class:`aligner.models.lora.PolicyView`: the policy engine run with its
    adapters off (or with the moved reference adapter), callable like an engine, with the same ``module``."""

    policy: Any
    reference: Any = None
    anchor: Any = None


@hookspec
def aligner_plugin_info() -> PluginInfo:
    """Say what this plugin is.

    Called once per plugin when it is activated, on that plugin alone and before
    any other hook; the registry uses the role to check that a run has at least
    one loss, at most one reference update and any number of constraints.
    """


@hookspec
def aligner_config_section() -> tuple[str, type] | None:
    """Contribute this plugin's options to the run config.

    Return ``(section_name, dataclass_type)``. The section is read from the YAML
    key of that name and from ``--set section.option=value``; unknown options
    are errors. The dataclass holds the defaults (the one source of truth for
    them) and may validate in ``__post_init__`` by raising ``ValueError``.
    Return ``None`` for a plugin without options.
    """


@hookspec
def aligner_required_models(config: RunConfig) -> set[str]:
    """Say which frozen or updated models this plugin needs beside the policy.

    :param config: the run config.

    Return a subset of ``{"reference", "anchor"}``. Only models that some
    active plugin asked for are built; their log-probs then appear in
    :class:`StepInputs`.
    """


@hookspec
def aligner_required_inputs(config: RunConfig) -> set[str]:
    """Ask for optional inputs beyond the paired log-probs.

    :param config: the run config.

    Return a subset of :data:`INPUTS` (``"unpaired"``, ``"kl_pairs"``); an
    unimplemented hook asks for nothing. The core computes an input only when
    some active plugin asked for it.
    """


@hookspec
def aligner_train_data(summary: DatasetSummary, config: RunConfig) -> None:
    """Look at the training set once it is loaded (for advice such as class balance).

    :param summary: the counts of the training set.
    :param config: the run config.

    Called once, on rank 0 only, before the engines are built: write warnings
    here; do not raise or communicate.
    """


@hookspec(firstresult=True)
def aligner_model_path(model: str, config: RunConfig) -> str | None:
    """Say which checkpoint to load for ``model`` (``"reference"`` or ``"anchor"``).

    :param model: the model being built.
    :param config: the run config.

    Return a local checkpoint folder (or ``embedded:...`` name), or ``None`` to
    leave the default: ``model.reference_path`` for the reference (else the
    policy's initial weights), the policy's initial weights for the anchor.

    Stops at first non-None result.
    """


@hookspec
def aligner_loss(inputs: StepInputs, config: RunConfig) -> LossOutput:
    """Compute the alignment loss of one micro-batch (role ``loss``).

    :param inputs: the log-probs of the policy and of the requested models.
    :param config: the run config; a plugin reads its own section from
        ``config.plugins[name]``.

    Return the mean loss over the micro-batch (unweighted: the core multiplies
    it by ``<section>.weight``, see :class:`LossConfig`, and logs it as
    ``<plugin name>/loss``) and its metrics, under the plugin's own prefix. The
    core logs ``rewards/*`` once for all losses (DPO-form implicit reward, see
    :mod:`aligner.training.rewards`) whenever a reference model is present.

    The core calls each active loss plugin's implementation on its own, in
    ``--plugins`` order (``aligner/training/step.py``), and adds the constraints' terms.
    """


@hookspec
def aligner_constraint(inputs: StepInputs, config: RunConfig) -> LossOutput | None:
    """Add a constraint term to the loss (role ``constraint``).

    :param inputs: as for :func:`aligner_loss`.
    :param config: the run config.

    The terms of every constraint are summed with the loss term before the
    backward pass, and ``train/loss`` logs that total. Return ``None`` to add
    nothing this micro-batch.
    """


@hookspec
def aligner_after_optimizer_step(step: int, engines: Engines, config: RunConfig, logged: bool) -> dict[str, float] | None:
    """React to a completed optimizer step (role ``reference_update`` and others).

    :param step: the number of optimizer steps taken so far (1 after the first).
    :param engines: the DeepSpeed engines; the reference may be changed in place.
    :param config: the run config.
    :param logged: whether this step's metrics are written (``train.log_every``, the last step): a metric
        that costs a collective or a pass over the weights is worth computing only then.

    Called on every rank (all ranks get the same ``logged``). Return metrics to log at this step, or ``None``.
    """


@hookspec
def aligner_report_panels() -> list[tuple[str, str, list[str]]] | None:
    """Declare this plugin's plots for ``aligner-report``.

    Return ``(file stem, title, TensorBoard tag patterns)`` per panel, e.g.
    ``("trust_region", "Trust region: reference-policy distance", ["tr/ref_policy_l2"])``;
    patterns are ``fnmatch`` globs. A panel whose tags a run did not log is skipped.
    The report asks every installed plugin, so it needs no list of plugin tags of its own.
    """


@hookspec
def aligner_state_dict() -> dict[str, Any] | None:
    """Return this plugin's state to store in a checkpoint (picklable tensors,
    numbers, strings, lists and dicts), or ``None`` if it has none."""


@hookspec
def aligner_load_state_dict(state: dict[str, Any]) -> None:
    """Restore the state that :func:`aligner_state_dict` returned, on resume.

    :param state: the dict this plugin saved (each plugin gets its own).
    """


@hookspec
def aligner_save_checkpoint(directory: Path, engines: Engines, config: RunConfig) -> None:
    """Write this plugin's per-rank state into a checkpoint being saved.

    :param directory: the checkpoint folder being written; a plugin writes only
        under ``directory / <plugin name>``. It may not be published yet (an
        atomic save renames it when every rank is done), so write nothing
        elsewhere.
    :param engines: the DeepSpeed engines of the run.
    :param config: the run config.

    Called on every rank, after the policy engine wrote its shards. For state
    that a rank holds only a part of (the reference's ZeRO-3 shards after a
    trust-region update); small state goes through :func:`aligner_state_dict`.
    """


@hookspec
def aligner_load_checkpoint(directory: Path, engines: Engines, config: RunConfig) -> None:
    """Restore what :func:`aligner_save_checkpoint` wrote, on resume.

    :param directory: the checkpoint folder being resumed from.
    :param engines: the DeepSpeed engines, already built and with the policy restored.
    :param config: the run config.

    Called on every rank. Raise ``ValueError`` with a message naming the file
    when the saved state does not fit the run (a different model or world size).
    """


@hookspec
def aligner_logger_start(run: RunStart, config: RunConfig) -> dict[str, Any] | None:
    """Open this logger's run (role ``logger``), on rank 0, before any engine is built.

    :param run: the resolved config, the model plan, the plugins' versions, and, on ``--resume``, the
        step and what this logger returned here in the run being resumed (:class:`RunStart`).
    :param config: the run config; a logger reads its own section from it.

    Import the logger's library here, not at module import, so that a run that does not choose this
    logger never imports it; when it is missing, raise ``ImportError`` naming the extra to install
    (``pip install 'aligner[<name>]'``). Any exception stops the run (exit code 2) with its message.

    Return a small JSON-serialisable dict (e.g. ``{"run_id": ...}``) to keep in every checkpoint's
    marker; it comes back as ``run.resumed`` on ``--resume``. Return ``None`` to keep nothing.
    """


@hookspec
def aligner_log(step: int, metrics: dict[str, float]) -> None:
    """Log scalars at an optimizer step (role ``logger``, required), on rank 0.

    :param step: the optimizer step (0 for the evaluation before training).
    :param metrics: tag -> value, exactly what TensorBoard gets at this step: every ``train.log_every``
        step's training scalars (averaged over micro-batches and ranks, see docs/tensorboard.md),
        and each evaluation's ``eval/...`` scalars in a call of their own. A value may be NaN ("no value
        here"). On ``--resume`` the steps after the checkpoint are logged again with the resumed run's values.
    """


@hookspec
def aligner_log_final(summary: RunSummary) -> None:
    """Log the end of a run that reached ``train.max_steps`` (role ``logger``), on rank 0.

    :param summary: the final metrics, the report's PNG plots, where the final model is and where it was
        pushed (:class:`RunSummary`). Called after the export (and the push), before
        :func:`aligner_logger_close`.
    """


@hookspec
def aligner_logger_close(status: str) -> None:
    """Close this logger's run (role ``logger``), on rank 0, once, however the run ends.

    :param status: ``"finished"`` (trained to ``train.max_steps``; a failed push to the Hub still counts),
        ``"stopped"`` (a stop request after a checkpoint: the run is meant to be resumed) or ``"failed"``.
    """
