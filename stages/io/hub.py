"""``export.push_to_hub: {repo_id, private}``: publish the exported folder through ``huggingface_hub``.

One commit with every file of the folder (``HfApi.create_repo`` with ``exist_ok``, then ``HfApi.create_commit``
with one ``CommitOperationAdd`` per file: the same call ``upload_folder`` ends in, but with the operations built
here, so a test can check exactly what would be sent without the network). The token is huggingface_hub's own
(``HF_TOKEN`` or ``hf auth login``); offline (``HF_HUB_OFFLINE``) the push is refused before the export starts.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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
    from huggingface_hub import CommitOperationAdd  # lazy: startup

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts))
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]


def push_folder(folder: Path, cfg: PushToHubConfig, default_message: str, api: Any = None) -> dict[str, Any]:
    """Create (or reuse) ``cfg.repo_id`` and commit every file of ``folder`` in one commit; return what was pushed."""
    if offline():
        raise RuntimeError(f"push_to_hub: HF_HUB_OFFLINE is set; cannot push {folder} to {cfg.repo_id}")
    from huggingface_hub import HfApi  # lazy: startup

    api = api or HfApi()
    repo = api.create_repo(repo_id=cfg.repo_id, private=cfg.private, repo_type="model", exist_ok=True)
    ops = commit_operations(folder)
    if not ops:
        raise RuntimeError(f"push_to_hub: {folder} holds no files to push")
    info = api.create_commit(repo_id=cfg.repo_id, repo_type="model", operations=ops, revision=cfg.revision,
                             commit_message=cfg.commit_message or default_message)
    return {"repo_id": cfg.repo_id, "url": str(getattr(repo, "url", repo) or ""), "files": [o.path_in_repo for o in ops],
            "commit": getattr(info, "oid", None), "commit_url": getattr(info, "commit_url", None)}


# ----------------------------------------------------------------------------- is the hub there? (issue 26 item 4)
# One answer per process and endpoint: a dry run asks it for the model, its download size and each dataset, and
# the answer must cost one short connect, never a retry loop (huggingface_hub's own retries take close to a minute).
_REACH: dict[str, str | None] = {}


def hub_offline(datasets: bool = False) -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE; with ``datasets``, HF_DATASETS_OFFLINE too) set the way the libraries
    read it."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") + (("HF_DATASETS_OFFLINE",) if datasets else ())
    return any(os.environ.get(k, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for k in names)


def hub_unreachable(timeout: float = 1.0) -> str | None:
    """Why the hub's host cannot be reached within ``timeout`` seconds (name lookup and one TCP connect), or None.
    Asked only where something would be downloaded; remembered for the process (per ``HF_ENDPOINT``)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint in _REACH:
        return _REACH[endpoint]
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            why = None
    except OSError as exc:
        why = f"{host}:{port}: {exc.strerror or exc}"
    _REACH[endpoint] = why
    return why


def network_state(probe: bool = True, datasets: bool = False) -> tuple[bool, str]:
    """(online, why not): offline when an *_OFFLINE variable is set (see :func:`hub_offline`), or (``probe``) when
    the hub cannot be reached."""
    if _WENT_OFFLINE:
        return False, _WENT_OFFLINE[-1]
    if hub_offline(datasets):
        return False, "HF_HUB_OFFLINE is set" if hub_offline() else "HF_DATASETS_OFFLINE is set"
    if probe and (why := hub_unreachable()) is not None:
        return False, f"the hub cannot be reached ({why})"
    return True, ""


_WENT_OFFLINE: list[str] = []  # why go_offline set HF_HUB_OFFLINE (so later messages give the real reason)


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets read only their caches from now on in this process, as
    HF_HUB_OFFLINE=1 would: a run whose files are all cached then starts at once instead of retrying the network
    for about a minute. Called when the hub cannot be reached and everything the run needs is cached."""
    if not hub_offline():
        _WENT_OFFLINE.append(f"the hub cannot be reached ({hub_unreachable()})")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants  # lazy: startup

    hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # read at its import; patch the module it already made
        import datasets.config  # lazy: startup

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
