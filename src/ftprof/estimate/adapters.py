"""LoRA adapters for the estimator: what an adapter configuration is (:class:`LoraSpec`) and what it makes of a
model (:class:`LoraFacts`): which Linear layers are adapted, how many parameters train and how many stay frozen.

Counted as ``peft`` (0.21) builds the model, without importing it (tests check every count against a real
``get_peft_model``):

* a target name matches a module whose name is it or ends with ``.<name>`` (``check_target_module_exists``);
  only ``nn.Linear`` and GPT-2's ``Conv1D`` (its weight is ``in x out``: ``fan_in_fan_out``) are adapted here;
* an adapted layer gains ``lora_A`` (``r x in``) and ``lora_B`` (``out x r``), no bias;
* a sequence classifier's head (modules named ``classifier`` or ``score``: peft's ``modules_to_save`` for
  ``SEQ_CLS``, matched by name suffix, so DistilBERT's ``pre_classifier`` too) is wrapped with a trainable
  copy, while the original stays, frozen: the model grows by the head's size;
* everything else is frozen (``requires_grad=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftprof.errors import ConfigError
from ftprof.train.adapters import attention_targets

if TYPE_CHECKING:
    import torch

HEAD_MODULES = ("classifier", "score")  # peft's modules_to_save for task_type SEQ_CLS

# Where an adapted layer sits in a transformer block, by the module's name: what its input is decides what
# freezing the weights saves (see :func:`ftprof.estimate.estimator.lora_saved_activations`).
ROLES: dict[str, tuple[str, ...]] = {
    "q": ("query", "q_lin", "q_proj"),
    "k": ("key", "k_lin", "k_proj"),
    "v": ("value", "v_lin", "v_proj"),
    "qkv": ("c_attn", "query_key_value", "qkv_proj"),
    "o": ("attention.output.dense", "attn.c_proj", "out_lin", "o_proj", "attention.dense"),
    "fc1": ("intermediate.dense", "mlp.c_fc", "lin1", "gate_proj", "up_proj", "fc1"),
    "fc2": ("output.dense", "mlp.c_proj", "lin2", "down_proj", "fc2"),
}


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA configuration: rank, scale, dropout on the adapter's input, and the layers it adapts.

    >>> LoraSpec(r=16).targets_for("llama")
    ('q_proj', 'v_proj')
    >>> LoraSpec(r=8, target_modules=("c_attn", "c_proj")).targets_for("gpt2")
    ('c_attn', 'c_proj')
    """

    r: int = 8  # rank of the update B @ A (``ftprof train``'s default, so an estimate predicts what it runs)
    alpha: int = 16  # the update is scaled by alpha / r (no memory effect)
    dropout: float = 0.05  # applied to each adapted layer's input before lora_A (its mask is saved)
    target_modules: tuple[str, ...] = ()  # module names (suffixes); empty: the family's default

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"--lora_r {self.r!r}: must be a positive integer")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora_dropout {self.dropout!r}: must be >= 0 and < 1")

    @classmethod
    def from_flags(cls, r: int, alpha: int, dropout: float, target_modules: str | None) -> LoraSpec:
        """The spec of ``--lora_r``, ``--lora_alpha``, ``--lora_dropout`` and ``--lora_target_modules`` (a comma
        list; empty or None: the family's default).

        >>> LoraSpec.from_flags(16, 32, 0.0, " q_proj, v_proj").target_modules
        ('q_proj', 'v_proj')
        """
        targets = tuple(t.strip() for t in (target_modules or "").split(",") if t.strip())
        return cls(r=r, alpha=alpha, dropout=dropout, target_modules=targets)

    def targets_for(self, model_type: str) -> tuple[str, ...]:
        """The modules this spec adapts in a model of ``model_type``: its own, or the family's default.

        Raises:
            ConfigError: no targets given and no default known for ``model_type``.
        """
        if self.target_modules:
            return self.target_modules
        default = attention_targets(model_type)  # the one table ``ftprof train`` adapts by default
        if default is None:
            raise ConfigError(
                f"LoRA has no default target modules for {model_type!r}; name them with --lora_target_modules"
            )
        return default


@dataclass(frozen=True)
class AdaptedLayer:
    """One adapted Linear: its module name, input and output widths, and its role in the block."""

    name: str
    fan_in: int
    fan_out: int
    role: str  # a key of ROLES, or "other"


@dataclass(frozen=True)
class LoraFacts:
    """What a LoRA spec makes of one model: adapted layers and parameter counts (exact, as peft builds it).

    ``trainable_sizes`` are the trainable parameters' elements in peft's order (the optimizer's one group);
    ``head_saves_input``: the module that takes the last layer's output is trainable (saves what it reads).
    """

    spec: LoraSpec
    layers: tuple[AdaptedLayer, ...]
    adapter_params: int
    head_params: int  # the trainable copy of the classification head (0 for a causal LM)
    frozen_params: int  # every parameter of the base model, the original head included
    trainable_sizes: tuple[int, ...]
    head_saves_input: bool = True

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.head_params

    @property
    def params(self) -> int:
        """All parameters of the peft model."""
        return self.frozen_params + self.trainable_params

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(layer.role for layer in self.layers)


def role_of(name: str) -> str:
    """The role of module ``name`` in a transformer block (``"other"`` if none).

    >>> role_of("bert.encoder.layer.0.attention.output.dense"), role_of("bert.encoder.layer.0.output.dense")
    ('o', 'fc2')
    >>> role_of("transformer.h.1.attn.c_attn"), role_of("bert.pooler.dense")
    ('qkv', 'other')
    """
    for role, suffixes in ROLES.items():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            if role == "fc2" and name.endswith("attention.output.dense"):
                continue
            return role
    return "other"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of target names: the name itself, or a ``.``-separated suffix."""
    return name in targets or any(name.endswith("." + t) for t in targets)


def linear_widths(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of an adaptable layer: ``nn.Linear``, or transformers' ``Conv1D`` (weight ``in x out``)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def lora_facts(model: torch.nn.Module, spec: LoraSpec, model_type: str, classifier: bool) -> LoraFacts:
    """The layers ``spec`` adapts in ``model`` (a transformers model, e.g. on the meta device) and the counts.

    ``classifier``: the model is a sequence classifier (peft's SEQ_CLS, which trains the head too).

    Raises:
        ConfigError: a target name that matches no Linear layer (the message lists the Linear names).
    """
    targets = spec.targets_for(model_type)
    heads = HEAD_MODULES if classifier else ()
    linear_names: list[str] = []
    layers: list[AdaptedLayer] = []
    head_roots: list[str] = []
    for name, module in model.named_modules():
        if heads and any(name.endswith(h) for h in heads) and not any(name.startswith(r + ".") for r in head_roots):
            head_roots.append(name)
        widths = linear_widths(module)
        if widths is None:
            continue
        linear_names.append(name)
        in_head = any(name == r or name.startswith(r + ".") for r in head_roots)
        if _matches(name, targets) and not in_head:
            layers.append(AdaptedLayer(name, widths[0], widths[1], role_of(name)))
    matched = {t for t in targets if any(_matches(layer.name, (t,)) for layer in layers)}
    if missing := [t for t in targets if t not in matched]:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ConfigError(
            f"--lora_target_modules {','.join(missing)!r}: no Linear layer of this model is named so; "
            f"its Linear layers: {','.join(short)}"
        )
    return _count(model, spec, layers, head_roots)


def _count(model: torch.nn.Module, spec: LoraSpec, layers: list[AdaptedLayer], head_roots: list[str]) -> LoraFacts:
    """Parameter counts in peft's order: each adapted layer's lora_A then lora_B where it sits; a wrapped head's
    trainable copy where the head sits."""
    by_name = {layer.name: layer for layer in layers}
    sizes: list[int] = []
    head_params = 0
    for name, _ in model.named_modules():
        if name in by_name:
            layer = by_name[name]
            sizes += [spec.r * layer.fan_in, layer.fan_out * spec.r]
        elif name in head_roots:
            head = [p.numel() for p in model.get_submodule(name).parameters()]
            sizes += head
            head_params += sum(head)
    frozen = sum(p.numel() for p in model.parameters())
    # A frozen pooler between the last layer and the head reads the first token: nothing saves its input.
    pooler = any(name.endswith("pooler") for name, _ in model.named_modules())
    return LoraFacts(
        spec=spec,
        layers=tuple(layers),
        adapter_params=sum(spec.r * (lay.fan_in + lay.fan_out) for lay in layers),
        head_params=head_params,
        frozen_params=frozen,
        trainable_sizes=tuple(sizes),
        head_saves_input=bool(head_roots) and not pooler,
    )


def lora_facts_for(model: str, spec: LoraSpec, task: str = "classification", num_labels: int = 2) -> LoraFacts:
    """:func:`lora_facts` of a known architecture, local directory or reachable Hub id, built on the meta
    device (no memory, no weights) as ``task`` builds it.

    Raises:
        ModelError: the architecture can't be found offline.
        ConfigError: a target name that matches no Linear layer.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ftprof.train.models import resolve_model_spec

    config = resolve_model_spec(model, random_init=True).config
    config.num_labels = num_labels
    with torch.device("meta"):
        auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
        net = auto.from_config(config)
    return lora_facts(net, spec, config.model_type, classifier=task != "causal-lm")
