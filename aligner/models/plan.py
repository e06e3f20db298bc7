"""The model plan of a run: which models exist, where each comes from, in which dtype, and how it is held.

It is computed once, from the config and the active plugins (:func:`make_plan`),
and everything else reads it: ``aligner/recipes/train.py`` builds the engines and the
static log-prob caches from it, the step and the evaluation score the models it
lists, ``launch/eval.py`` scores its two models through the same scoring, and
``aligner-estimate`` prints it (``--json``: under ``"plan"``). A training run
writes the plan it built from to ``output_dir/plan.json``, with the engines it
actually holds, so the two can be compared.

The rules, each written here only:

- the policy is always built and trained;
- the reference and the anchor exist only when some plugin asked for them
  (``aligner_required_models``); their source is the plugin's
  ``aligner_model_path`` answer, else ``model.reference_path`` for the
  reference, else the policy's initial weights;
- a reference that a ``reference_update`` plugin moves is fp32 (bf16 loses
  small-α updates to rounding, PLATFORM.md), never cached and never shared;
- a model nothing moves is ``cached`` when ``train.cache_static_logps`` is on
  and the data is paired (the cache holds pairs only); the reference stays
  live, though, when a plugin asked for ``kl_pairs`` (its log-probs on the
  step's mismatched pairs are not in the cache);
- an anchor with the same source as an unmoved reference, held the same way
  (both live or both cached), shares the reference's engine or cache;
- under ``model.lora`` (aligner/models/lora.py) a live model whose source is the
  policy's initial weights has no engine: it ``shares`` the policy's, with
  ``adapters`` ``off`` (the base: B = 0 at the start, so base = initial
  policy); a moved reference is the policy engine with its frozen
  ``reference`` adapter (``adapters: reference``), in the policy's dtype. A
  reference from another ``model.reference_path`` gets an engine of its own
  (it cannot move: refused with a reference-update plugin).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The models a run may hold, in build order.
NAMES = ("policy", "reference", "anchor")
#: What the source of a frozen model is when nothing names one.
POLICY_INITIAL = "policy"


@dataclass(frozen=True)
class ModelSpec:
    """One model of the plan.

    :param source: a local folder, an ``embedded:`` name, or ``"policy"`` (the policy's initial weights).
    :param state: ``trained`` (the policy), ``live`` (an engine runs every step), ``cached`` (its log-probs are
        computed once in a pre-pass; the engine is dropped afterwards).
    :param shares: the model whose engine or cache this one is (the anchor sharing the reference's; under LoRA
        ``policy``: the policy engine), or None.
    :param moves: a reference-update plugin changes it in place.
    :param adapters: with ``shares == "policy"``, how the policy engine runs for it: ``off`` (the base model) or
        ``reference`` (the frozen reference adapter in place of the policy's).
    """

    name: str
    source: str
    dtype: str
    state: str
    shares: str | None = None
    moves: bool = False
    adapters: str | None = None


    def adapters_text(self) -> str:
        """How a model that shares the policy's engine runs it, for the ``models built:`` line."""
        return "policy with adapters off" if self.adapters == "off" else f"policy with its {self.adapters} adapter"


@dataclass(frozen=True)
class ModelPlan:
    """The models of a run and the optional inputs (:data:`aligner.hookspecs.INPUTS`) some plugin asked for."""

    models: dict[str, ModelSpec]
    inputs: frozenset[str] = field(default_factory=frozenset)

    def __contains__(self, name: str) -> bool:
        return name in self.models

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def scored_as(self, name: str) -> str | None:
        """The model whose log-probs are ``name``'s (it shares that model's engine or cache, weights and all), or
        None. A model that shares the policy's engine under LoRA runs it with other adapters: scored on its own."""
        spec = self.models.get(name)
        return spec.shares if spec is not None and spec.shares not in (None, "policy") else None

    def needs(self, input_name: str) -> bool:
        """Whether some plugin asked for the optional input ``input_name`` (``unpaired``, ``kl_pairs``)."""
        return input_name in self.inputs

    def frozen(self) -> list[ModelSpec]:
        """The reference and the anchor, those the plan holds."""
        return [spec for name, spec in self.models.items() if name != "policy"]

    def with_state(self, state: str, own: bool = True) -> list[ModelSpec]:
        """The models in ``state``; with ``own``, only those that have an engine or cache of their own."""
        return [s for s in self.models.values() if s.state == state and not (own and s.shares)]

    def to_dict(self) -> dict[str, Any]:
        return {"models": {n: asdict(s) for n, s in self.models.items()}, "inputs": sorted(self.inputs)}

    def describe(self) -> str:
        """One line, as the ``models built:`` log line and the estimator print it."""
        parts = []
        for spec in self.models.values():
            how = spec.state if spec.shares is None else f"{spec.state}, shares {spec.shares}"
            how += f", adapters {spec.adapters}" if spec.adapters else ""
            parts.append(f"{spec.name} ({spec.dtype}, {how}{', moved' if spec.moves else ''})")
        return ", ".join(parts)


def _same_source(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))


def _source(name: str, cfg, plugins) -> str:
    chosen = plugins.first_result("aligner_model_path", model=name, config=cfg)
    if chosen is None and name == "reference":
        chosen = cfg.model.reference_path
    if chosen is None or _same_source(str(chosen), cfg.model.name_or_path):
        return POLICY_INITIAL
    return str(chosen)


def make_plan(cfg, plugins, paired_data: bool = True) -> ModelPlan:
    """The plan of a run with config ``cfg`` and active plugins ``plugins`` (:class:`aligner.registry.ActivePlugins`).

    :param paired_data: whether the run's data is preference pairs (the static cache holds pairs only).
    """
    required = plugins.required_models(cfg)
    inputs = frozenset(plugins.required_inputs(cfg))
    moving = plugins.reference_update is not None
    cache = bool(cfg.train.cache_static_logps) and paired_data
    models = {"policy": ModelSpec("policy", POLICY_INITIAL, cfg.model.dtype, "trained")}
    if "reference" in required:
        state = "cached" if cache and not moving and "kl_pairs" not in inputs else "live"
        source = _source("reference", cfg, plugins)
        models["reference"] = ModelSpec("reference", source, "float32" if moving else cfg.model.dtype, state, moves=moving)
        if cfg.model.lora is not None:
            models["reference"] = _lora_reference(models["reference"], cfg)
    if "anchor" in required:
        source, state = _source("anchor", cfg, plugins), "cached" if cache else "live"
        ref = models.get("reference")
        shares = "reference" if ref is not None and not ref.moves and ref.source == source and ref.state == state else None
        models["anchor"] = ModelSpec("anchor", source, cfg.model.dtype, state, shares)
        if cfg.model.lora is not None and shares is None and state == "live" and source == POLICY_INITIAL:
            models["anchor"] = ModelSpec("anchor", source, cfg.model.dtype, state, "policy", adapters="off")
    return ModelPlan(models, inputs)


def _lora_reference(spec: ModelSpec, cfg) -> ModelSpec:
    """The reference under ``model.lora``: the policy engine with adapters off, or its moved reference adapter;
    a live reference from another model keeps an engine of its own (and cannot be moved)."""
    if spec.moves and spec.source != POLICY_INITIAL:
        from aligner.config import ConfigError

        raise ConfigError(
            f"model.reference_path ({spec.source}) is another model than the policy's, and a reference-update plugin "
            f"moves the reference; under model.lora the moved reference is an adapter on the policy's base, so it "
            f"must start as the policy: leave model.reference_path out, or drop the reference-update plugin"
        )
    if spec.moves:
        return ModelSpec("reference", spec.source, cfg.model.dtype, "live", "policy", True, "reference")
    if spec.state == "live" and spec.source == POLICY_INITIAL:
        return ModelSpec("reference", spec.source, cfg.model.dtype, "live", "policy", adapters="off")
    return spec


def write_plan(plan: ModelPlan, built: dict[str, str], output_dir: str | Path, batch_path: dict | None = None) -> Path:
    """Write ``output_dir/plan.json``: the plan, per model what the run holds (``built``), and the run's batch path
    (aligner/scoring/batch_path.py)."""
    path = Path(output_dir) / "plan.json"
    extra = {"batch_path": batch_path} if batch_path is not None else {}
    path.write_text(json.dumps({**plan.to_dict(), "built": built, **extra}, indent=2, sort_keys=True))
    return path
