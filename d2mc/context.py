"""The one object every pass reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """State of one compile: the model in hand, what was loaded beside it, and what passes found.

    ``results`` holds analysis results keyed by what a pass ``provides`` (``"roofline"``,
    ``"redundancy"``, ``"plan"``...); each key has one writer, the pass that provides it (the
    :class:`~d2mc.pipeline.PassManager` checks). ``report`` collects what ends up in the report, by section.
    Initial keys such as ``"model"``, ``"tokenizer"``, ``"profile"`` and ``"calibration"`` count as provided
    when the corresponding attribute is set.
    """

    model: Any = None  # transformers.PreTrainedModel
    tokenizer: Any = None
    arch: Any = None  # d2mc.arch.ModelArch of the model in hand
    profile: Any = None  # d2mc.profiles.DeviceProfile
    calibration: Any = None  # torch.LongTensor [N, S] of calibration token ids
    teacher: Any = None  # the dense parent, when a pass needs it after the model changed
    source: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    ATTRIBUTE_KEYS = ("model", "tokenizer", "arch", "profile", "calibration", "teacher")

    def available(self) -> set[str]:
        """Keys a pass may require right now."""
        keys = {k for k in self.ATTRIBUTE_KEYS if getattr(self, k) is not None}
        return keys | set(self.results)

    @classmethod
    def from_loaded(cls, loaded, profile=None, calibration=None) -> Context:
        """A context over a :class:`d2mc.loading.LoadedModel`."""
        return cls(model=loaded.model, tokenizer=loaded.tokenizer, arch=loaded.arch, profile=profile,
                   calibration=calibration, source=loaded.reference)
