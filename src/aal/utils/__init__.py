"""Small process-level helpers: seeding, RNG snapshots, malloc tuning, threads, ranks, model modes.

Example:
    >>> from aal.utils import seed_everything
    >>> seed_everything(0)
    0
"""

from aal.utils.modes import eval_mode
from aal.utils.runtime import (
    configure_threads,
    get_rng_state,
    is_main_process,
    malloc_tuned,
    resolve_device,
    seed_everything,
    set_rng_state,
    tune_malloc,
    world_size,
)

__all__ = [
    "configure_threads",
    "eval_mode",
    "get_rng_state",
    "is_main_process",
    "malloc_tuned",
    "resolve_device",
    "seed_everything",
    "set_rng_state",
    "tune_malloc",
    "world_size",
]
