"""--compile: regional compilation of the student, one ``torch.compile`` per T5 block.

The encoder and decoder repeat one block, so compiling blocks (not the whole model) compiles a few
variants of one function (the first block computes the position bias, the others receive it; the
decoder's blocks also attend to the encoder) and reuses them for every layer. Shapes are symbolic
(``dynamic=True``): batches of any length and size reuse the compiled code instead of recompiling per
shape. Blocks are compiled in place (``nn.Module.compile``), so parameters, state-dict keys, DeepSpeed's
hooks and ``save_pretrained`` exports are untouched. Generation runs the blocks eagerly: its cached
single-token steps would be further variants to compile for little gain.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.fx.experimental._config

# Variants of T5Block.forward kept compiled (torch's default, 8, is shared by all blocks since they
# run one function; past the limit torch falls back to eager).
RECOMPILE_LIMIT = 32


def compile_refusal(device_type: str, zero_stage: int) -> str | None:
    """Why --compile cannot work here (one line), or None."""
    if zero_stage == 3:
        return ("--compile: not with ZeRO-3 (its hooks gather each block's parameters inside the block's "
                "forward, which torch.compile cannot trace); use --ds_config zero0, zero1 or zero2")
    if not torch._dynamo.is_dynamo_supported():
        return (f"--compile: torch {torch.__version__} has no torch.compile for Python "
                f"{sys.version_info.major}.{sys.version_info.minor}")
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "--compile on GPUs needs triton (pip install triton, matching your torch), or drop --compile"
    else:
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except (RuntimeError, OSError):
            return ("--compile on CPUs needs a C++ compiler (g++, or the one $CXX names) for the compiled "
                    "kernels: install one (e.g. apt-get install g++), or drop --compile")
    return None


def compile_blocks(t5) -> int:
    """Compile every encoder and decoder block in place; returns how many."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # Sizes that happen to be equal at the first call (a batch of 32 and 32 label tokens) are otherwise
    # assumed equal, and the next batch recompiles; set while tracing, which happens at the first calls.
    torch.fx.experimental._config.use_duck_shape = False
    blocks = [*t5.encoder.block, *t5.decoder.block]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def eager_blocks():
    """A context in which compiled blocks run eagerly (generation)."""
    return torch.compiler.set_stance("force_eager")


class CompileClock:
    """Seconds spent compiling in this process (forward and backward graphs, recompilations), from
    torch's compile start/end callbacks."""

    def __init__(self):
        self.seconds, self.reported, self._started = 0.0, 0.0, None
        torch._dynamo.callback_handler.register_start_callback(self._start)
        torch._dynamo.callback_handler.register_end_callback(self._end)

    def _start(self, *args):
        self._started = time.perf_counter()

    def _end(self, *args):
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def since_report(self) -> float:
        """Compile seconds since the last call."""
        new, self.reported = self.seconds - self.reported, self.seconds
        return new

    def close(self) -> None:
        torch._dynamo.callback_handler.remove_start_callback(self._start)
        torch._dynamo.callback_handler.remove_end_callback(self._end)
