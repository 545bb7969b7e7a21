"""Processes and preemption: jax.distributed start-up, the persistent compilation cache, SIGTERM handling.

Preemption. One process alone catches SIGTERM and saves at the current step. With several processes the save is
collective, so they must agree on the step: jax's preemption service (on with jax.distributed) catches SIGTERM on
any host and names the same sync step on all of them. `Preemption.reached(step)` hides the difference.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal

import jax

from m3jax.core.storage import cache_dir

logger = logging.getLogger(__name__)


def enable_compilation_cache() -> None:
    """Persist compiled steps ($M3JAX_CACHE_DIR/xla, default ~/.cache/m3jax/xla): a resumed or repeated run with the
    same shapes skips compilation. JAX_COMPILATION_CACHE_DIR, when set, wins."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", cache_dir("xla"))


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """config.distributed (m3jax.config.distributed_settings); documented in m3jax.config.default_config."""

    initialize: str  # auto | always | never
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None


def initialize(settings: DistributedSettings) -> None:
    """jax.distributed.initialize when the settings or the launcher's environment ask for it.

    Explicit settings come from config.distributed.{coordinator_address,num_processes,process_id} or the env vars
    M3JAX_COORDINATOR_ADDRESS / M3JAX_NUM_PROCESSES / M3JAX_PROCESS_ID; with none of them, 'auto' initialises only
    under a multi-task SLURM job or a multi-host TPU slice (jax detects both itself).
    """
    if settings.initialize == "never" or jax.distributed.is_initialized():
        return
    address = settings.coordinator_address or os.environ.get("M3JAX_COORDINATOR_ADDRESS")
    num = settings.num_processes or (int(os.environ["M3JAX_NUM_PROCESSES"])
                                        if "M3JAX_NUM_PROCESSES" in os.environ else None)
    pid = settings.process_id if settings.process_id is not None else (
        int(os.environ["M3JAX_PROCESS_ID"]) if "M3JAX_PROCESS_ID" in os.environ else None)
    explicit = address is not None or num is not None or pid is not None
    launcher = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if settings.initialize == "auto" and not (explicit or launcher):
        return
    with contextlib.suppress(AttributeError, ValueError):  # CPU collectives across processes; accelerators ignore it
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)", address, num, pid)
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


class Preemption:
    """Has a SIGTERM asked this run to stop? Use as a context manager (restores the previous handler)."""

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.signalled = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if not self.multi_process:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def reached(self, step: int) -> bool:
        """True once every process should save `step` and stop (the same answer on all processes)."""
        if self.multi_process:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signalled = True
        return self.signalled

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
