"""``model.lora``: LoRA adapters through peft, and the policy engine's views with its adapters off or switched.

The policy becomes ``get_peft_model(model, LoraConfig(...))`` before DeepSpeed
wraps it: the base weights are frozen, only the adapters (and
``modules_to_save``) train, so the optimizer holds state for them alone. Each
targeted linear layer computes W₀x + (α/r)·B·A·x (Hu et al., arXiv:2106.09685,
Eq. 3), with A (r × in) drawn Kaiming-uniform from ``train.seed`` (the same on
every rank) and B (out × r) zero, so the policy starts equal to the base.

Because B = 0 at the start, the initial policy *is* the base model with its
adapters off: a reference or an anchor that equals the initial policy needs no
engine and no weights of its own. :class:`PolicyView` runs the policy engine
under peft's ``disable_adapter()`` (no gradients), as TRL does for PEFT models.
A reference that a ``reference_update`` plugin moves is a second adapter,
:data:`REFERENCE_ADAPTER`, of rank ``model.lora.reference_rank`` (default 2·r),
frozen (not in the optimizer) and run by switching the active adapter for the
forward (:class:`PolicyView` with ``adapter=REFERENCE_ADAPTER``).

The plan (aligner/models/plan.py) decides which view a model is; this module builds them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from aligner.config import ALL_LINEAR, ConfigError, LoraSection

#: The policy's trained adapter (peft's default name: ``final/`` loads with ``PeftModel.from_pretrained``).
POLICY_ADAPTER = "default"
#: The frozen adapter that holds a moved reference (base + this adapter = θ_ref).
REFERENCE_ADAPTER = "reference"


def adaptable_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct leaf names of the modules LoRA can adapt (linear and embedding layers), e.g. ``q_proj``."""
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds) and name})


def check_target_modules(model: torch.nn.Module, section: LoraSection) -> None:
    """Refuse ``model.lora.target_modules`` / ``modules_to_save`` names that match no module of ``model``."""
    names = {name for name, _ in model.named_modules() if name}
    for key, wanted in (("target_modules", section.target_modules), ("modules_to_save", section.modules_to_save)):
        if wanted is None or wanted == ALL_LINEAR:
            continue
        unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            raise ConfigError(
                f"model.lora.{key}: {', '.join(unmatched)} match no module of this {type(model).__name__}; the "
                f"linear and embedding modules it has are {', '.join(adaptable_module_names(model))}. Name some of "
                f"those, or leave target_modules out for {ALL_LINEAR!r} (every linear layer of the decoder)"
            )


def lora_config(section: LoraSection, rank: int | None = None, dropout: float | None = None) -> Any:
    """peft's ``LoraConfig`` for ``model.lora`` (``rank``/``dropout`` override r and dropout for the reference
    adapter, whose scale α/r stays the policy's: α is scaled with the rank)."""
    from peft import LoraConfig

    r = rank or section.r
    return LoraConfig(r=r, lora_alpha=section.alpha * r / section.r, lora_dropout=section.dropout if dropout is None else dropout,
                      target_modules=section.target_modules, modules_to_save=section.modules_to_save,
                      bias="none", task_type="CAUSAL_LM")


def wrap(model: torch.nn.Module, section: LoraSection, seed: int, reference_adapter: bool = False) -> Any:
    """The policy as a ``PeftModel``: adapters on ``target_modules``, the base frozen, A drawn from ``seed``.

    ``reference_adapter``: also add the frozen :data:`REFERENCE_ADAPTER` (rank ``section.ref_rank``, no dropout,
    zero: the reference starts as the base), for a reference that a plugin moves.
    """
    from peft import get_peft_model

    check_target_modules(model, section)
    peft_model = get_peft_model(model, lora_config(section))
    if reference_adapter:
        if section.modules_to_save:
            raise ConfigError("model.lora.modules_to_save cannot be combined with a reference-update plugin: the moved "
                              "reference is a second adapter, and a fully trained module has no low-rank form to move; "
                              "leave modules_to_save out, or drop the reference-update plugin from --plugins")
        peft_model.add_adapter(REFERENCE_ADAPTER, lora_config(section, section.ref_rank, dropout=0.0))
        peft_model.base_model.set_adapter(POLICY_ADAPTER)  # trainable again: add_adapter leaves it as it was
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters(), key=lambda item: item[0]):
            if ".lora_A." in name and f".{POLICY_ADAPTER}." in name:
                torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)  # peft's own init, seeded
            elif ".lora_" in name:
                param.zero_()  # B of the policy; both factors of the reference adapter
            param.requires_grad_(f".{POLICY_ADAPTER}." in name and (".lora_" in name or "modules_to_save" in name))
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> int:
    """Elements the optimizer holds state for (the adapters and ``modules_to_save``)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)


def lora_layers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The peft LoRA layers of ``model`` (a ``PeftModel`` or a DeepSpeed engine around one)."""
    from peft.tuners.lora import LoraLayer

    return (m for m in getattr(model, "module", model).modules() if isinstance(m, LoraLayer))


@contextmanager
def active_adapter(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run the LoRA layers with adapter ``name`` instead of the policy's, without touching ``requires_grad``
    (peft's ``set_adapter`` would make it trainable under a running optimizer)."""
    layers = list(lora_layers(model))
    saved = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = [name]
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer._active_adapter = value


class PolicyView:
    """The policy engine seen as another model: with its adapters off (``adapter=None``: the base, i.e. the
    initial policy) or with adapter ``adapter`` in place of the policy's. Forward only, under ``no_grad``.

    It has what the scoring code reads of an engine (``module``, calling it, ``eval``/``train`` no-ops), and
    ``shares = "policy"``: ``plan.json`` records that it holds no engine of its own.
    """

    shares = "policy"

    def __init__(self, engine: Any, adapter: str | None = None) -> None:
        self.engine, self.adapter = engine, adapter
        self.module = engine.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        peft_model = self.engine.module
        context = peft_model.disable_adapter() if self.adapter is None else active_adapter(peft_model, self.adapter)
        with torch.no_grad(), context:
            return self.engine(*args, **kwargs)

    def eval(self) -> PolicyView:
        return self

    def train(self, mode: bool = True) -> PolicyView:
        return self
