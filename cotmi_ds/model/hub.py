"""Hub models are downloaded once per node: local rank 0 fetches the model's (and tokenizer's) files
into the Hugging Face cache while the node's other ranks wait, then every rank loads from the cache.
Without it, every rank of every node downloads the same files at once. With HF_HUB_OFFLINE=1 nothing
is fetched (compute nodes without internet: pre-download with `hf download NAME` into a shared HF_HOME).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from cotmi_ds.config import TrainConfig
from cotmi_ds.distributed import DistEnv, barrier


def hub_names(cfg: TrainConfig) -> list[str]:
    """The model and tokenizer names that are hub ids (not 'scratch', not a local folder)."""
    names = [n for n in (cfg.model, cfg.tokenizer) if n and n != "scratch" and not Path(n).exists()]
    return list(dict.fromkeys(names))


def download(name: str) -> None:
    """The files from_pretrained reads: configs, tokenizer files and one format of weights."""
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(name)
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
    snapshot_download(name, allow_patterns=["*.json", "*.model", "*.txt", *weights])


def fetch_once_per_node(cfg: TrainConfig, env: DistEnv, fetch: Callable[[str], None] = download) -> None:
    from huggingface_hub import constants

    names = hub_names(cfg)
    if not names or env.world_size == 1 or constants.HF_HUB_OFFLINE:
        return
    if env.local_rank == 0:
        for name in names:
            try:
                fetch(name)
            except Exception:  # noqa: BLE001 - every rank's from_pretrained then reports it, in one line
                pass
    barrier(env)  # the other ranks start loading once their node's files are in the cache
