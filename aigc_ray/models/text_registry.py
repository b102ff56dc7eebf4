"""The text-model registry: one object per language-model family (gpt, rnn-lm), as registry.py is for images.

A text family builds its network from a ``TextModelConfig`` (aigc_ray/text_config.py) and names its own
settings (``model.options``). Every text network has one calling convention, which training, evaluation,
decoding and serving rely on and never branch around:

    logits, state = net(tokens, state=None, use_cache=False)
        tokens (B, T) int64 byte ids; logits (B, T, vocab_size) float;
        state: what the next call continues from (a Transformer's per-layer keys/values, an RNN's hidden
        state); None when use_cache is False (training). ``net.max_context``: the most positions a state may
        hold (a learned-position Transformer's block size), or None for no limit.

Torch only: nothing here imports Ray. Kept apart from the image registry, whose families all generate images
(tests/test_families.py trains every image family registered there).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn


@dataclasses.dataclass
class StepGraph:
    """One decoding step of a network with its state as plain tensors in and out, for tracing to ONNX
    (aigc_ray/text_export.py): the module, example inputs (batch 1, 2 new positions after 3 cached), the input
    and output names (``tokens`` first in, ``logits`` first out; a ``position`` input when the step needs the
    count of cached positions), dynamic axes, and per state input the shape of an empty state (-1 for the
    batch, 0 for the cached positions)."""

    module: nn.Module
    example: tuple
    inputs: list[str]
    outputs: list[str]
    axes: dict
    state_shapes: dict[str, list[int]]

    @property
    def state_inputs(self) -> list[str]:
        return [n for n in self.inputs if n not in ("tokens", "position")]


class TextFamily:
    """Subclass, set the class attributes, implement ``build`` (and ``step_graph`` for an ONNX export)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    """A dataclass of the family's own settings: a docstring per field, checked in ``__post_init__``."""

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.Options))

    def build(self, model_cfg) -> nn.Module:
        raise NotImplementedError

    def check(self, model_cfg) -> None:
        """Raise ValueError for settings valid one by one but not together."""

    def step_graph(self, net: nn.Module) -> StepGraph:
        raise ValueError(f"model.family: no ONNX step graph for text family {self.name!r}")


_TEXT_FAMILIES: dict[str, TextFamily] = {}


def register_text(family_cls: type[TextFamily]) -> type[TextFamily]:
    if family_cls.name in _TEXT_FAMILIES:
        raise ValueError(f"text model family {family_cls.name!r} is registered twice")
    _TEXT_FAMILIES[family_cls.name] = family_cls()
    return family_cls


def get_text_family(name: str) -> TextFamily:
    try:
        return _TEXT_FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.family={name!r} is not a registered text model family; "
                         f"registered: {', '.join(text_family_names())}") from None


def text_family_names() -> tuple[str, ...]:
    return tuple(_TEXT_FAMILIES)


def build_text_model(model_cfg) -> nn.Module:
    return get_text_family(model_cfg.family).build(model_cfg)
