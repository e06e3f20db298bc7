"""Models named by Hub ID: fetched into (or found in) the Hugging Face cache, as a local snapshot folder.

``snapshot_download`` puts a model repository at
``$HF_HOME/hub/models--<org>--<name>/snapshots/<commit>/`` (``refs/<branch>`` holds the
commit a branch points to) and returns that folder; ``from_pretrained`` then reads it like
any checkpoint folder. With ``HF_HUB_OFFLINE=1`` nothing is downloaded: a model in the
cache is used, and a missing one is refused with the command that fetches it.

Only what training needs is fetched: configs, tokenizer files and weights, not the
duplicate ``original/`` checkpoints some repositories carry (16 GB more for Llama-3-8B).
Code shipped with a model is fetched but runs only with ``model.trust_remote_code: true``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from aligner.models import ModelError

#: Files a repository may hold that training never reads.
IGNORE = ["original/*", "*.pth", "*.pt", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite",
          "*.mlmodel", "coreml/*", "onnx/*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_cache() -> Path:
    """The hub cache folder, read from the environment now (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "huggingface")
    return Path(home) / "hub"


def is_hub_id(name: str) -> bool:
    """``org/name`` or ``name``, and not a local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and ".." not in name


def fetch_command(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str:
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    rev = f" --revision {revision}" if revision else ""
    return f"hf download{kind} {repo_id}{rev}"


def snapshot(repo_id: str, key: str, revision: str | None = None) -> Path:
    """The local snapshot folder of model ``repo_id`` at ``revision``, downloading it unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    at = f" at revision {revision}" if revision else ""
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache(), ignore_patterns=IGNORE,
                                   local_files_only=offline())
    except GatedRepoError:
        raise ModelError(f"{key}: {repo_id} is a gated model; accept its license on huggingface.co and log in "
                         f"(`hf auth login`), then run again") from None
    except RevisionNotFoundError:
        raise ModelError(f"{key}: {repo_id} has no revision {revision!r}; set model.revision to a branch, tag or "
                         f"commit of it") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{key}: no model {repo_id!r} on the Hub (or it is private: log in with `hf auth login`); "
                         f"give a Hub model ID or a local checkpoint folder") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if offline() else "the Hub cannot be reached")
        raise ModelError(f"{key}: model {repo_id}{at} is not in the Hugging Face cache ({hub_cache()}) and {why}. "
                         f"Fetch it on a machine with network: `{fetch_command(repo_id, revision)}`, or give a local "
                         f"checkpoint folder") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{key}: the snapshot of {repo_id}{at} ({folder}) has no config.json; it is not a "
                         f"transformers model, or its download is incomplete: `{fetch_command(repo_id, revision)}`")
    return folder


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """A file of ``repo_id`` if the cache has it (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache(), revision=revision)
    return Path(found) if isinstance(found, str) else None
