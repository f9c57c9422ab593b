"""What the console shows: only rank 0 speaks, and progress bars only where a person watches a
terminal that reports its width."""
from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cotmi_ds.distributed import DistEnv


def terminal_width_known() -> bool:
    """A bar needs a terminal that reports its width: on a 0-column pseudo-terminal (some CI
    wrappers and containers allocate one) tqdm would draw nothing at all."""
    if not sys.stderr.isatty():
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):
        return False


def quiet_libraries(env: DistEnv) -> None:
    """Libraries' own bars and warnings: only rank 0 speaks, and only bars a person will watch."""
    import datasets
    import transformers

    # torch's deprecation notices for the collectives DeepSpeed calls: dozens per rank and step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not (env.is_main and terminal_width_known()):
        datasets.disable_progress_bars()
