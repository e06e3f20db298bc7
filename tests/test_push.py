"""The push to the Hub (aligner/publishing/push.py) offline, for real (HF_HUB_OFFLINE=1, huggingface_hub's own refusal),
and the export keys' bad values. The exit code of a run whose push fails is checked in tests/test_loggers_e2e.py."""

from __future__ import annotations

import hashlib

import pytest

from aligner.config import ConfigError, ExportConfig, build_config
from aligner.publishing.push import PushError, push_to_hub, upload_command


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_offline_push_names_the_cause_the_fix_and_the_command_and_touches_nothing(random_model_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    final = tmp_path / "final"
    shutil.copytree(random_model_dir, final)
    before = digest(final)
    export = ExportConfig(push_to_hub=True, hub_model_id="me/tiny", hub_private=True, hub_revision="v1")
    with pytest.raises(PushError) as caught:
        push_to_hub(final, export)
    assert str(caught.value) == (
        f"cannot push to me/tiny: HF_HUB_OFFLINE=1 forbids uploads. Unset HF_HUB_OFFLINE (on a machine that reaches "
        f"the Hub). Training succeeded and {final} is intact; to upload it by hand: "
        f"`hf upload me/tiny {final} . --revision v1 --private`")
    assert digest(final) == before


def test_the_upload_command_quotes_paths(tmp_path):
    assert upload_command(tmp_path / "a b", ExportConfig(hub_model_id="o/n")) == f"hf upload o/n '{tmp_path}/a b' ."


@pytest.mark.parametrize("export, problem", [
    ({"push_to_hub": True}, r"export.push_to_hub: true needs export.hub_model_id, the repository to push to"),
    ({"push_to_hub": True, "hub_model_id": "just-a-name"}, r"export.hub_model_id must be <user or org>/<name>"),
    ({"hub_model_id": "org/with space"}, r"export.hub_model_id must be <user or org>/<name>.*got 'org/with space'"),
    ({"hub_private": "yes"}, r"key 'export.hub_private' expects true or false"),
])
def test_bad_export_keys_are_refused_with_the_key_and_an_example(export, problem):
    with pytest.raises(ConfigError, match=problem):
        build_config({"export": export})
