"""``export.push_to_hub: {repo_id, private}``: publish the exported folder through ``huggingface_hub``.

One commit with every file of the folder (``HfApi.create_repo`` with ``exist_ok``, then ``HfApi.create_commit``
with one ``CommitOperationAdd`` per file: the same call ``upload_folder`` ends in, but with the operations built
here, so a test can check exactly what would be sent without the network). The token is huggingface_hub's own
(``HF_TOKEN`` or ``hf auth login``); offline (``HF_HUB_OFFLINE``) the push is refused before the export starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from prunelab.stages.core.config import StrictModel


class PushToHubConfig(StrictModel):
    repo_id: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$",
                         description="the Hub repository to create or update, 'user-or-org/name'")
    private: bool = Field(True, description="create the repository private (an existing one keeps its visibility)")
    commit_message: str | None = Field(None, description="default: 'prunelab: <recipe name>'")
    revision: str | None = Field(None, description="branch to commit to (default: main)")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def push_problems(cfg: PushToHubConfig | None, where: str) -> list[str]:
    """What --dry-run reports about a push: offline, nothing can be pushed."""
    if cfg is not None and offline():
        return [f"{where}.push_to_hub: HF_HUB_OFFLINE is set, so {cfg.repo_id} cannot be pushed; unset it, or drop "
                "push_to_hub and upload the run's model/ later (`hf upload REPO runs/NAME/model`)"]
    return []


def commit_operations(folder: Path) -> list[Any]:
    """One ``CommitOperationAdd`` per file of ``folder`` (paths relative to it; hidden files left out)."""
    from huggingface_hub import CommitOperationAdd

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts))
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]


def push_folder(folder: Path, cfg: PushToHubConfig, default_message: str, api: Any = None) -> dict[str, Any]:
    """Create (or reuse) ``cfg.repo_id`` and commit every file of ``folder`` in one commit; return what was pushed."""
    if offline():
        raise RuntimeError(f"push_to_hub: HF_HUB_OFFLINE is set; cannot push {folder} to {cfg.repo_id}")
    from huggingface_hub import HfApi

    api = api or HfApi()
    repo = api.create_repo(repo_id=cfg.repo_id, private=cfg.private, repo_type="model", exist_ok=True)
    ops = commit_operations(folder)
    if not ops:
        raise RuntimeError(f"push_to_hub: {folder} holds no files to push")
    info = api.create_commit(repo_id=cfg.repo_id, repo_type="model", operations=ops, revision=cfg.revision,
                             commit_message=cfg.commit_message or default_message)
    return {"repo_id": cfg.repo_id, "url": str(getattr(repo, "url", repo) or ""), "files": [o.path_in_repo for o in ops],
            "commit": getattr(info, "oid", None), "commit_url": getattr(info, "commit_url", None)}
