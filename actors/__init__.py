"""The relay's actors: Registry, Dispatcher and Sender shards, each beside its plain logic.

The public facade: `WakeupRunner` runs one wakeup and returns a `RunResult`;
`RegistryHandle` is the `DeviceRegistry` the HTTP API talks to.
"""

from __future__ import annotations

from actors.delivery import HaltInfo
from actors.pace import Progress, RunResult
from actors.registry import DeviceRegistry, RegistryHandle
from actors.wakeup import ProgressLogger, WakeupRunner

__all__ = ["DeviceRegistry", "HaltInfo", "Progress", "ProgressLogger", "RegistryHandle",
           "RunResult", "WakeupRunner"]
