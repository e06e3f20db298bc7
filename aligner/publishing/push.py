"""Push the exported model to the Hugging Face Hub (``export.push_to_hub``), on rank 0, once the export is complete.

``final/`` is uploaded as it is, in one commit: the model (or the PEFT adapter), its tokenizer, its model card
``README.md``, and under ``model.lora`` with ``export.merge_lora`` the merged model in ``merged/``. The
repository ``export.hub_model_id`` is created when missing (private with ``export.hub_private``), and the
branch ``export.hub_revision`` from the default branch when missing.

A push that cannot happen (offline, no token, the Hub refuses, the network fails) never touches ``final/``: it
raises :class:`PushError`, whose message names the cause, the fix, and the command that uploads the same
folder by hand; the run then exits with :data:`EXIT_PUSH_FAILED`, which says that training and the export
succeeded and only the push failed. The run warns at its start when the push cannot work (offline, no token).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from aligner.models import hub

log = logging.getLogger("aligner")
#: The exit code of a run that trained and exported its model, but could not push it to the Hub.
EXIT_PUSH_FAILED = 6


class PushError(RuntimeError):
    """The upload to the Hub failed; the message says why, what to do, and how to upload by hand."""


def upload_command(folder: Path, export: Any) -> str:
    """The ``hf upload`` command that uploads ``folder`` as the run would have."""
    parts = ["hf", "upload", export.hub_model_id, str(folder), "."]
    if export.hub_revision:
        parts += ["--revision", export.hub_revision]
    if export.hub_private:
        parts.append("--private")
    return shlex.join(parts)


def token_present() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def warn_if_push_cannot_work(export: Any) -> None:
    """At the start of a run: a push that would fail for a reason known now is said now, not after training."""
    if not export.push_to_hub:
        return
    if hub.offline():
        log.warning("export.push_to_hub: HF_HUB_OFFLINE=1 is set, so the push to %s at the end of this run will "
                    "fail (exit code %d; the export stays in output_dir/final). Unset HF_HUB_OFFLINE to push",
                    export.hub_model_id, EXIT_PUSH_FAILED)
    elif not token_present():
        log.warning("export.push_to_hub: no Hugging Face token (HF_TOKEN, or `hf auth login`), so the push to %s "
                    "at the end of this run will fail (exit code %d); log in before the run ends",
                    export.hub_model_id, EXIT_PUSH_FAILED)


def push_to_hub(folder: Path, export: Any) -> str:
    """Upload ``folder`` to ``export.hub_model_id``; the commit's URL. Raises :class:`PushError` on any failure."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    repo, revision = export.hub_model_id, export.hub_revision
    by_hand = f"Training succeeded and {folder} is intact; to upload it by hand: `{upload_command(folder, export)}`"
    api = HfApi()
    try:
        api.create_repo(repo, private=export.hub_private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), revision=revision,
                                   commit_message="Upload model trained with aligner")
    except OfflineModeIsEnabled:
        raise PushError(f"cannot push to {repo}: HF_HUB_OFFLINE=1 forbids uploads. Unset HF_HUB_OFFLINE (on a "
                        f"machine that reaches the Hub). {by_hand}") from None
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            why = ("no Hugging Face token was found: log in with `hf auth login` or set HF_TOKEN" if not token_present()
                   else f"the token has no write access to {repo.split('/')[0]}: use a write token of an account "
                        f"that may create {repo}")
        else:
            why = "check export.hub_model_id and export.hub_revision"
        raise PushError(f"the Hub refused the push to {repo} (HTTP {status}: {_first_line(exc)}); {why}. "
                        f"{by_hand}") from None
    except Exception as exc:  # noqa: BLE001 - the network, the disk: whatever it is, the model is safe
        raise PushError(f"the push to {repo} failed: {type(exc).__name__}: {_first_line(exc)}. Check the network "
                        f"(and HF_ENDPOINT), then upload again. {by_hand}") from None
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo}"
    log.info("pushed %s to %s", folder, url)
    return url


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
