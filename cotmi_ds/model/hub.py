"""Hub names: what `from_pretrained` is given for a --model or --tokenizer, and the download once per node.

``resolve`` turns a name into what to load, asking the hub at most once per process and name with
one short request: a local folder is used as it is; a hub name is handed on when the hub answers
for it; when the hub cannot be asked (HF_HUB_OFFLINE=1) or reached, the name's folder in the local
Hugging Face cache is loaded instead, so that `from_pretrained` never waits on its retries (half a
minute per file). Anything else is one line naming the flag, why, and the names that work offline.

Downloads: local rank 0 of each node fetches the files into the cache while the node's other ranks
wait, then every rank loads from the cache (without it, every rank of every node downloads the same
files at once). Compute nodes without internet: pre-download with `hf download NAME` into a shared
HF_HOME and set HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from cotmi_ds.config import TrainConfig
from cotmi_ds.errors import UsageError
from cotmi_ds.flags import suggest

if TYPE_CHECKING:
    from cotmi_ds.distributed import DistEnv

# One request, no retries: a hub that answers does so well within this.
PROBE_TIMEOUT_S = 5.0
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
# What each use reads from a model's files: one file of each group.
NEEDS = {"config": (("config.json",),), "model": (("config.json",), WEIGHT_FILES), "tokenizer": (TOKENIZER_FILES,)}


def is_hub_name(name: str | None) -> bool:
    """Not 'scratch', not an existing path: a name for the hub (or its local cache)."""
    return bool(name) and name != "scratch" and not Path(name).expanduser().exists()


def hub_names(cfg: TrainConfig) -> list[str]:
    """The model and tokenizer names that are hub ids (not 'scratch', not a local folder)."""
    return list(dict.fromkeys(n for n in (cfg.model, cfg.tokenizer) if is_hub_name(n)))


def _has(folder: Path, use: str) -> bool:
    return all(any((folder / f).is_file() for f in group) for group in NEEDS[use])


def cached_folder(name: str, use: str = "model") -> Path | None:
    """The name's snapshot in the local Hugging Face cache when it holds what ``use`` reads."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    try:
        repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model")
        ref = (repo / "refs" / "main").read_text().strip()
    except (OSError, ValueError):
        return None
    folder = repo / "snapshots" / ref
    return folder if _has(folder, use) else None


def cached_names(use: str = "model") -> list[str]:
    """Every model in the local Hugging Face cache that holds what ``use`` reads."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE)
    names = ("/".join(p.name.split("--")[1:]) for p in root.glob("models--*")) if root.is_dir() else ()
    return sorted(n for n in names if cached_folder(n, use) is not None)


# Why the hub could not be reached, once seen in this process: later names do not wait for it again.
_hub_down: str | None = None


def forget() -> None:
    """Forget what the hub said (tests, or a process whose network has changed)."""
    global _hub_down
    _hub_down = None
    ask_hub.cache_clear()


@functools.cache
def ask_hub(name: str) -> str | None:
    """None when the hub knows the model; else why not, one phrase ("unreachable: ..." when the hub
    could not be asked). One request per process and name, no retries."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import get_session, hf_raise_for_status, validate_repo_id

    global _hub_down
    if constants.HF_HUB_OFFLINE:
        return "unreachable: HF_HUB_OFFLINE=1 is set"
    if _hub_down is not None:
        return _hub_down
    try:
        validate_repo_id(name)
        # model_info's request without its headers: building them can fetch a registry of its own first
        token = get_token()
        hf_raise_for_status(get_session().get(f"{constants.ENDPOINT}/api/models/{name}", timeout=PROBE_TIMEOUT_S,
                                              headers={"authorization": f"Bearer {token}"} if token else {}))
        return None
    except GatedRepoError:
        return (f"a gated model: accept its terms on {constants.ENDPOINT}/{name} and log in "
                "(hf auth login, or HF_TOKEN)")
    except RepositoryNotFoundError:
        return "no such model on the Hugging Face hub (or a private one: log in with hf auth login, or HF_TOKEN)"
    except ValueError as e:  # the name's form (HFValidationError): no request was made
        return f"not a local folder, nor a hub name ({str(e).splitlines()[0]})"
    except HfHubHTTPError as e:  # 5xx and the like: the hub is there but cannot answer
        why = f"unreachable: the hub answered {e.response.status_code}" if e.response is not None else f"unreachable: {e}"
    except Exception as e:  # noqa: BLE001 - DNS, refused, timed out, proxy: all mean "cannot ask from here"
        why = f"unreachable: the Hugging Face hub cannot be reached from {socket.gethostname()} ({_first_line(e)})"
    _hub_down = why
    return why


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve(name: str, flag: str, use: str = "model", offline_names: Iterable[str] = ()) -> str:
    """What to hand ``from_pretrained`` for ``flag name``: a local path as it is; a hub name as it is
    when the hub knows it; its folder in the local cache when the hub cannot be asked or reached.
    Otherwise one UsageError naming the flag, why, and the names that work offline (the cache's
    models, and ``offline_names``: those a command knows without files, e.g. `cotmi plan`'s table)."""
    if not is_hub_name(name):
        return name
    problem = ask_hub(name)
    if problem is None:
        return name
    cached = cached_folder(name, use)
    if cached is not None and problem.startswith("unreachable"):
        return str(cached)
    usable = list(dict.fromkeys([*offline_names, *cached_names(use)]))
    work = (f"names that work without the hub: {', '.join(usable)}" if usable
            else "the local Hugging Face cache holds no model")
    said = f"{flag} {name}{suggest(name, usable)}"
    if not problem.startswith("unreachable"):
        raise UsageError(f"{said}: {problem}; {work}")
    partly = " (only part of it: no weights)" if use == "model" and cached_folder(name, "config") else ""
    raise UsageError(f"{said}: not in the local Hugging Face cache{partly}, and {problem.removeprefix('unreachable: ')}"
                     f"; {work}; or pass a local save_pretrained folder, or download it where there is network "
                     f"(hf download {name}) into a shared HF_HOME")


def resolve_names(cfg: TrainConfig) -> None:
    """The model's and tokenizer's names resolved (or refused, naming the flag) before anything heavy:
    the loaders later get the same answers without asking again."""
    resolve(cfg.model, "--model")
    if cfg.tokenizer is not None:
        resolve(cfg.tokenizer, "--tokenizer", "tokenizer")
    elif cfg.model != "scratch":
        resolve(cfg.model, "--model", "tokenizer")


def download(name: str) -> None:
    """The files from_pretrained reads: configs, tokenizer files and one format of weights."""
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(name)
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
    snapshot_download(name, allow_patterns=["*.json", "*.model", "*.txt", *weights])


def fetch_once_per_node(cfg: TrainConfig, env: DistEnv, fetch: Callable[[str], None] = download,
                        wait: Callable[[DistEnv], None] | None = None) -> None:
    """Local rank 0 downloads the hub names the hub knows (``resolve`` hands the others to the cache);
    the node's other ranks wait for it (``wait``: the barrier)."""
    if env.world_size == 1:
        return
    names = [n for n in hub_names(cfg) if ask_hub(n) is None]
    if not names:
        return
    if env.local_rank == 0:
        for name in names:
            try:
                fetch(name)
            except Exception:  # noqa: BLE001 - every rank's from_pretrained then reports it, in one line
                pass
    if wait is None:
        from cotmi_ds.distributed import barrier as wait
    wait(env)  # the other ranks start loading once their node's files are in the cache
