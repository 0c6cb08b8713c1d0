"""The small contract every deployment flow implements.

A backend turns measurement requests (``Entry``) into runnable workpieces; the timing itself
lives in ``amoeba_profile.measure`` so every flow is timed the same way. Backends know nothing
of tables or pickers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..arch import ModelArch
from ..entry import Entry
from ..measure import Workpiece


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str
    install_hint: str = ""


@dataclass(frozen=True)
class Capabilities:
    per_layer_heads: bool
    per_layer_ffn: bool
    components: tuple[str, ...]
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]


class BuiltUnit(ABC):
    """Modules built once for a group of entries that share them (see ``Entry.unit``).

    One workpiece step runs ``repeat`` copies of the component; the tracker divides by it.
    """

    repeat: int = 1

    @abstractmethod
    def workpiece(self, entry: Entry) -> Workpiece: ...

    def close(self) -> None:
        """Free what the unit holds; the default drops nothing."""


class Backend(ABC):
    name: str = ""
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability: ...

    @classmethod
    @abstractmethod
    def capabilities(cls) -> Capabilities: ...

    @abstractmethod
    def environment(self) -> dict[str, Any]:
        """Versions and flags that a table built with this backend depends on."""

    @abstractmethod
    def build(self, arch: ModelArch, entry: Entry) -> BuiltUnit:
        """Build the modules for ``entry.unit`` (random weights, never downloaded)."""

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the device ran out of memory (recorded as an ``oom`` row)."""
        return isinstance(exc, MemoryError)
