"""`cotmi export --push_to_hub REPO`: an export folder uploaded to the Hugging Face Hub through
huggingface_hub. The credentials are huggingface_hub's own (``HF_TOKEN``, or ``hf auth login``'s
stored token): nothing here reads, passes or writes a token.
"""
from __future__ import annotations

from pathlib import Path

from cotmi_ds.errors import UsageError


def check_repo_id(repo: str) -> str:
    """One line for a name the Hub would refuse, before anything is written."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UsageError(f"--push_to_hub {repo!r}: not a Hub repository name (NAMESPACE/NAME): "
                         f"{str(e).splitlines()[0]}") from None
    return repo


def push(folder: Path, repo: str, private: bool = True) -> str:
    """Create the model repository if needed and upload the folder as one commit; the URL of the
    commit. Any failure (no network, offline mode, no or bad credentials) is one line saying the
    export itself is complete and how to retry."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                 commit_message="Upload a cotmi_ds export")
    except Exception as e:  # noqa: BLE001 - network, offline mode, authentication: all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--push_to_hub {repo}: the upload failed ({type(e).__name__}: {reason}); the export "
                         f"in {folder} is complete: retry with network and Hub credentials (HF_TOKEN or "
                         f"`hf auth login`), e.g. `hf upload {repo} {folder}`") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")
