"""Models by Hub ID (aligner/models/hub.py, loading.resolve_path): a Hub cache layout in a temporary HF_HOME, read through
the real huggingface_hub and from_pretrained with HF_HUB_OFFLINE=1, and an end-to-end run that names its model
by Hub ID and its data as a dataset repository folder with named splits."""

import json
import math
import shutil

import datasets
import pytest

from aligner.config import build_config
from aligner.models import ModelError, hub, loading
from aligner.tools import estimate
from conftest import launch, read_scalars

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAGGED = "fedcba9876543210fedcba9876543210fedcba98"


def hub_layout(home, repo_id, folder, commits=((COMMIT, "main"),)):
    """``$HF_HOME/hub/models--org--name/snapshots/<commit>/`` with the files of ``folder``, and ``refs/<name>``."""
    root = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for commit, ref in commits:
        shutil.copytree(folder, root / "snapshots" / commit)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return root


@pytest.fixture
def hf_home(tmp_path, monkeypatch, random_model_dir):
    home = tmp_path / "hf"
    hub_layout(home, "tiny-org/tiny-llama", random_model_dir, ((COMMIT, "main"), (TAGGED, "v1")))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def test_a_hub_id_resolves_to_its_cached_snapshot_and_loads_through_from_pretrained(hf_home):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = loading.resolve_path("tiny-org/tiny-llama", "model.name_or_path")
    assert path == hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == 259
    # the same ID straight through transformers' own resolution, offline
    assert AutoConfig.from_pretrained("tiny-org/tiny-llama", cache_dir=hf_home / "hub").vocab_size == 259


def test_a_revision_picks_its_snapshot_and_an_unknown_one_names_the_fetch_command(hf_home):
    assert loading.resolve_path("tiny-org/tiny-llama", "model.name_or_path", "v1").name == TAGGED
    with pytest.raises(ModelError, match=r"model tiny-org/tiny-llama at revision v9 is not in the Hugging Face "
                                                r"cache .*HF_HUB_OFFLINE=1 forbids downloading it.*"
                                                r"`hf download tiny-org/tiny-llama --revision v9`"):
        loading.resolve_path("tiny-org/tiny-llama", "model.name_or_path", "v9")


def test_a_model_missing_offline_names_the_id_and_the_command(hf_home):
    with pytest.raises(ModelError, match=r"model.reference_path: model someorg/absent is not in the Hugging Face "
                                                r"cache .*`hf download someorg/absent`"):
        loading.resolve_path("someorg/absent", "model.reference_path")


def test_a_snapshot_without_config_json_is_refused(hf_home, tmp_path):
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "README.md").write_text("x")
    hub_layout(hf_home, "tiny-org/no-config", tmp_path / "weights-only")
    with pytest.raises(ModelError, match=r"the snapshot of tiny-org/no-config .* has no config.json"):
        loading.resolve_path("tiny-org/no-config", "model.name_or_path")


def test_model_tokenizer_and_chat_template_override_the_policys(hf_home, tmp_path, random_model_dir):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    for value in (template, str(tmp_path / "t.jinja")):
        cfg = build_config({"model": {"name_or_path": "tiny-org/tiny-llama", "tokenizer": str(random_model_dir),
                                      "chat_template": value}})
        tok = loading.run_tokenizer(cfg, loading.resolve_path(cfg.model.name_or_path, "model.name_or_path"))
        assert tok.chat_template == template
        assert tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "[user]a"
    cfg = build_config({"model": {"chat_template": str(tmp_path / "missing.jinja")}})
    with pytest.raises(ModelError, match=r"model.chat_template: .*missing.jinja is neither a file nor a Jinja template"):
        loading.run_tokenizer(cfg, random_model_dir)
    cfg = build_config({"model": {"tokenizer": "someorg/absent-tokenizer"}})
    with pytest.raises(ModelError, match=r"model.tokenizer: model someorg/absent-tokenizer is not in the Hugging Face cache"):
        loading.run_tokenizer(cfg, random_model_dir)


def test_hub_ids_are_told_apart_from_paths(tmp_path):
    assert hub.is_hub_id("meta-llama/Meta-Llama-3-8B-Instruct") and hub.is_hub_id("gpt2")
    assert not hub.is_hub_id(str(tmp_path / "x")) and not hub.is_hub_id("./x") and not hub.is_hub_id("a/b/c")


def test_the_estimate_reads_a_cached_config_json_or_the_built_in_shape_of_a_known_id(hf_home):
    shape, source = estimate.load_shape(None, "tiny-org/tiny-llama")
    assert shape.vocab_size == 259 and source.endswith(f"{COMMIT}/config.json")
    shape, source = estimate.load_shape(None, "meta-llama/Meta-Llama-3-8B-Instruct")
    assert shape.hidden_size == 4096 and source == "built-in shape of meta-llama/Meta-Llama-3-8B-Instruct"
    with pytest.raises(estimate.EstimateError, match=r"the config.json of someorg/absent is not in the Hugging Face "
                                                     r"cache; fetch it \(`hf download someorg/absent config.json`\)"):
        estimate.load_shape(None, "someorg/absent")


def test_the_shipped_8b_config_is_estimated_with_no_model_config(capsys):
    assert estimate.main(["--config", "configs/llama3-8b-zero3.yaml", "--gpus", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == pytest.approx(8.03e9, rel=0.01)


def test_flipguard_accepts_an_anchor_by_hub_id():
    from aligner.registry import activate

    plugins = activate(["dpo", "flipguard"])
    cfg = build_config({"flipguard": {"anchor_path": "tiny-org/anchor"}}, plugins.config_sections())
    assert cfg.section("flipguard").anchor_path == "tiny-org/anchor"


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory, random_model_dir):
    """One 2-rank run: the policy by Hub ID from a cache layout, data from a repository folder with named splits
    in HuggingFaceH4/ultrafeedback_binarized's format (a prompt string repeated inside the conversations)."""
    root = tmp_path_factory.mktemp("hub-run")
    hub_layout(root / "hf", "tiny-org/tiny-llama", random_model_dir)
    rows = [{"prompt": f"sort {i} 1 =", "chosen": [{"role": "user", "content": f"sort {i} 1 ="},
                                                   {"role": "assistant", "content": f" 1 {i}"}],
             "rejected": [{"role": "user", "content": f"sort {i} 1 ="}, {"role": "assistant", "content": f" {i} 1"}]}
            for i in range(2, 10)]
    (root / "ultra" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(root / "ultra" / "data" / "train_prefs-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[:4]).to_parquet(str(root / "ultra" / "data" / "test_prefs-00000-of-00001.parquet"))
    out = root / "run"
    proc = launch(["--config", "configs/tiny-cpu.yaml", "--plugins", "dpo", "--set", f"output_dir={out}",
                   "model.name_or_path=tiny-org/tiny-llama", f"data.train={root / 'ultra'}", "data.train_split=train_prefs",
                   f"data.eval={root / 'ultra'}", "data.eval_split=test_prefs", "train.max_steps=2", "train.micro_batch_size=2"],
                  env={"HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "ALIGNER_CACHE": str(root / "cache")})
    return proc, out, root


@pytest.mark.slow
def test_a_run_names_its_model_by_hub_id_and_reads_named_splits(hub_run):
    proc, out, _ = hub_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step, first = read_scalars(out / "tensorboard")["train/loss"][0]
    assert step == 1 and abs(first - math.log(2)) < 1e-4
    assert json.loads((out / "config.json").read_text())["model"]["name_or_path"] == "tiny-org/tiny-llama"


@pytest.mark.slow
def test_rank_0_tokenizes_once_and_the_other_rank_reads_the_cache(hub_run):
    proc, _, root = hub_run
    log = proc.stdout + proc.stderr
    assert log.count("data.train: tokenized 8 rows into the cache") == 1
    assert log.count("data.train: 8 tokenized rows from the cache") == 1
    assert len(list((root / "cache" / "tokenized").iterdir())) == 2  # train and eval
