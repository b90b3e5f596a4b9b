"""Model names that are Hugging Face Hub ids (`google/flan-t5-base`), resolved through
`huggingface_hub`: its local cache (`HF_HOME`, `HF_HUB_CACHE`), and a download when online
(`HF_HUB_OFFLINE=1` keeps it to the cache). A directory always wins over a hub id of the same
name."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# What a model directory needs: config, weights, tokenizer files. Safetensors first; pickled weights
# (read with weights_only=True) only for a repository that has no safetensors.
_MODEL_FILES = ["*.json", "*.safetensors", "spiece.model", "merges.txt", "*.txt"]
_LEGACY_WEIGHTS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
# huggingface_hub's repository-id rule: one optional namespace, letters, digits, "-", "_", "." in each part.
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}")


class HubModelNotFound(FileNotFoundError):
    """A name that is neither a directory nor a model the hub (or its cache) has."""


def is_repo_id(name: str) -> bool:
    """Whether `name` can be a hub repository id (`ORG/NAME` or `NAME`)."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and not name.endswith((".", "-"))


def cache_dir() -> str:
    """Where `huggingface_hub` keeps its cache (HF_HUB_CACHE, or HF_HOME/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def model_directory(name: str | os.PathLike) -> Path:
    """The directory of a model given as a path or a hub id: a directory as it is; a hub id from the
    cache, or downloaded when online. Raises `HubModelNotFound` (a FileNotFoundError) otherwise."""
    path = Path(name)
    if path.is_dir():
        return path
    text = str(name)
    if not is_repo_id(text):
        raise HubModelNotFound(f"{text} is not a directory, nor a Hugging Face Hub id (ORG/NAME)")
    return _snapshot(text)


def model_name(path: str | os.PathLike) -> str:
    """How to name the model at `path` to another program: its hub id when `path` is a snapshot in the
    Hugging Face cache (`.../models--ORG--NAME/snapshots/REVISION`), else the absolute path."""
    path = Path(path).resolve()
    cache = Path(cache_dir()).resolve()
    repo = path.parent.parent
    if path.parent.name == "snapshots" and repo.parent == cache and repo.name.startswith("models--"):
        return repo.name.removeprefix("models--").replace("--", "/")
    return str(path)


def cached_directory(name: str) -> Path | None:
    """The directory a hub id names in the local cache, without a download; None when `name` is no
    hub id or the cache does not hold it."""
    from huggingface_hub import snapshot_download

    if not is_repo_id(name):
        return None
    try:
        return Path(snapshot_download(name, allow_patterns=_MODEL_FILES, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError, an OSError), or not a valid id
        return None


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_MODEL_FILES))
        if not any(folder.glob("*.safetensors")) and not offline():
            folder = Path(snapshot_download(repo_id, allow_patterns=_LEGACY_WEIGHTS))
    except IncompleteSnapshotError as err:
        raise HubModelNotFound(
            f"{repo_id}: its copy in the Hugging Face cache ({cache_dir()}) is incomplete; download it again online"
        ) from err
    except LocalEntryNotFoundError as err:
        why = "offline: HF_HUB_OFFLINE=1" if offline() else "and the hub could not be reached"
        raise HubModelNotFound(
            f"{repo_id} is neither a directory nor a model in the Hugging Face cache ({cache_dir()}, {why})"
        ) from err
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise HubModelNotFound(
            f"{repo_id} is neither a directory nor a model of the Hugging Face Hub that this machine may read "
            f"({type(err).__name__})"
        ) from err
    except HfHubHTTPError as err:
        raise HubModelNotFound(f"{repo_id} is not a directory, and the Hugging Face Hub failed ({err})") from err
    log.info("%s: %s", repo_id, folder)
    return folder
