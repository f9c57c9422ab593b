"""The trainer queues its steps without waiting for the device: counted through torch itself (a
torch function mode sees every read of a value, inside DeepSpeed, transformers and torch too), per
step of real training runs on CPU. At ZeRO-0 (one GPU, the default) neither the trainer nor
DeepSpeed waits inside a step, only at the log, evaluation and save steps; at ZeRO-2 DeepSpeed's
own optimizer does, a fixed few times per step. The GPU check counts the same on a GPU, where
torch flags the waits itself."""
import collections

import pytest
import torch

from benchmarks.host_syncs import trainer_steps
from tests.conftest import TINY


pytestmark = pytest.mark.usefixtures("one_thread")

MASK_CHECK = "transformers/masking_utils.py:_ignore_bidirectional_mask_sdpa"


def _flags(args: list[str]) -> dict:
    flags = dict(zip(args[::2], args[1::2]))
    return {k.removeprefix("--"): v for k, v in flags.items()}


@pytest.mark.parametrize("ds_config, precision", [("zero0", "fp32"), ("zero0", "bf16"), ("zero2", "fp32")])
def test_host_waits_per_step(ds_config, precision, tmp_path, monkeypatch, data_cache_dir, one_rank):
    import cotmi_ds.training.loop as loop

    # The module's process group outlives each run (DeepSpeed keeps its groups for the process).
    monkeypatch.setattr(loop, "shutdown", lambda engine=None: engine.destroy())
    per_step = trainer_steps({**_flags(TINY), "synthetic_train_size": "64", "max_steps": "6", "log_every": "3",
                              "eval_every": "0", "save_every": "0", "ds_config": ds_config, "precision": precision,
                              "output_dir": str(tmp_path / "run"), "data_cache_dir": str(data_cache_dir)},
                             torch.device("cpu"))
    quiet = (1, 2, 4, 5)  # not a log, evaluation or save step
    for s in quiet:
        # Not even transformers' SDPA mask code asks whether a key is padded (it is given 4D masks).
        assert MASK_CHECK not in per_step[s], per_step[s]
        others = per_step[s]
        if ds_config == "zero0":
            assert not others, per_step[s]
        else:  # DeepSpeed's ZeRO-1/2 optimizer: its NaN/inf check and clipping, a few reads a step
            assert all(where.startswith("deepspeed/") for where in others) and sum(others.values()) <= 6, others
    for s in (3, 6):  # the logged values, the skip flags: read once each at a sync step
        assert any(where.startswith("cotmi_ds/training/") for where in per_step[s]), per_step
