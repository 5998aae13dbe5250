"""Hub ids ("facebook/opt-125m") through opt_spec.hub, in every backend, the config, the tokenizer and the CLI.

Nothing is downloaded: a Hugging Face cache is laid out here by hand, as huggingface_hub writes it
(models--facebook--opt-125m/blobs/<sha256>, snapshots/<commit>/<file> as relative symlinks into
../../blobs, refs/<branch> holding the commit), with a tiny random checkpoint and a byte-level BPE
tokenizer trained here, and read with HF_HUB_OFFLINE=1. The revision "v2" is another commit whose
weights (other values, sharded) and config differ, so a test sees which snapshot was loaded.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")

from opt_spec import OPTConfig  # noqa: E402
from opt_spec import hub  # noqa: E402
from opt_spec.io import save_safetensors_dir  # noqa: E402
from opt_spec.testing import random_weights  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "facebook/opt-125m"
COMMITS = {"main": hashlib.sha1(b"main").hexdigest(), "v2": hashlib.sha1(b"v2").hexdigest()}
CONFIG = OPTConfig(vocab_size=336, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                   max_position_embeddings=128, num_labels=2)
IDS = np.array([[2, 100, 7, 250, 31, 9], [1, 1, 2, 5, 300, 44]])  # the second row left-padded
MASK = (IDS != 1).astype(np.int64)


def train_tokenizer(directory):
    """A byte-level BPE (GPT-2's scheme, as OPT uses) with OPT's special ids 0..3: vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Hello, my name is Ada.", "The quick brown fox jumps over the lazy dog."] * 4, trainer)
    tok.model.save(str(directory))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}))
    token = {"__type": "AddedToken", "lstrip": False, "rstrip": False, "normalized": True, "single_word": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(  # as facebook/opt-125m's: </s> leads every input
        {"add_bos_token": True, "add_prefix_space": False, "errors": "replace",
         "pad_token": {**token, "content": "<pad>"},
         **{k: {**token, "content": "</s>"} for k in ("bos_token", "eos_token", "unk_token")}}))


def lay_out_hub_cache(cache, repo_id: str, revisions: dict[str, tuple[str, object]]) -> None:
    """Writes `repo_id` into the Hugging Face cache folder `cache` as huggingface_hub does:
    revisions = {branch: (commit hash, folder whose files make that snapshot)}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for branch, (commit, source) in revisions.items():
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name in sorted(os.listdir(source)):
            data = (source / name).read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            (repo / "blobs" / sha).write_bytes(data)  # identical files of two commits share one blob
            os.symlink(os.path.join("..", "..", "blobs", sha), snapshot / name)
        (repo / "refs" / branch).write_text(commit)  # no newline, as huggingface_hub writes it


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """{'cache': the cache folder, 'main' / 'v2': local folders with the same files as the two snapshots}."""
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("hub")
    folders = {}
    for branch, seed, shard in (("main", 1, "5GB"), ("v2", 2, "20KB")):
        folder = root / f"local-{branch}"
        folder.mkdir()
        train_tokenizer(folder)
        config = CONFIG.replace(init_std=0.02 if branch == "main" else 0.03)
        save_safetensors_dir(folder, random_weights(config, seed=seed), config.to_saved_dict("OPTForCausalLM",
                                                                                            "float32"), shard)
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 2,
                                                                   "pad_token_id": 1}))
        folders[branch] = folder
    assert (folders["v2"] / "model.safetensors.index.json").is_file()  # v2 is sharded: index + shards via blobs
    cache = root / "hf-cache"
    lay_out_hub_cache(cache, REPO, {b: (COMMITS[b], folders[b]) for b in folders})
    return {"cache": cache, **folders}


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """HF_HUB_CACHE -> the laid-out cache, downloads off."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def snapshot(hub_cache, branch):
    return str(hub_cache["cache"] / "models--facebook--opt-125m" / "snapshots" / COMMITS[branch])


# ------------------------------------------------------------------------------------------- resolver
def test_the_layout_is_what_huggingface_hub_reads(hub_cache):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    found = try_to_load_from_cache(REPO, "config.json", cache_dir=hub_cache["cache"], revision="v2")
    assert found == os.path.join(snapshot(hub_cache, "v2"), "config.json")
    info = scan_cache_dir(hub_cache["cache"])
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == set(COMMITS.values())
    assert info.warnings == []


def test_resolves_ids_from_the_cache_offline(offline, monkeypatch, tmp_path):
    assert hub.resolve_pretrained(REPO) == snapshot(offline, "main")
    assert hub.resolve_pretrained(REPO, revision="v2") == snapshot(offline, "v2")
    assert hub.resolve_pretrained(REPO, revision=COMMITS["v2"]) == snapshot(offline, "v2")  # a commit hash
    # cache_dir and local_files_only as arguments, with nothing in the environment
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    assert hub.resolve_pretrained(REPO, cache_dir=offline["cache"], local_files_only=True) == snapshot(offline, "main")
    # HF_HOME/hub is the default cache when HF_HUB_CACHE is not set
    assert hub.hub_cache_dir() == str(tmp_path / "empty-home" / "hub")


def test_a_local_folder_always_wins(offline, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "facebook" / "opt-125m"
    local.mkdir(parents=True)
    assert hub.resolve_pretrained(REPO) == REPO  # the relative folder, not the cache
    assert hub.resolve_pretrained(str(offline["main"])) == str(offline["main"])
    # a missing path that is no Hub id comes back unchanged: the caller reports it missing in its own words
    assert hub.resolve_pretrained(str(tmp_path / "nope")) == str(tmp_path / "nope")
    assert not hub.is_hub_id("./x") and not hub.is_hub_id("/a/b") and not hub.is_hub_id("a/b/c")
    assert hub.is_hub_id(REPO) and hub.is_hub_id("gpt2") and not hub.is_hub_id("a--b") and not hub.is_hub_id("-a")


def test_an_uncached_id_offline_names_the_id_revision_and_cache(offline, monkeypatch):
    cache = str(offline["cache"])
    with pytest.raises(hub.HubModelNotFoundError) as err:
        hub.resolve_pretrained("facebook/opt-350m")
    msg = str(err.value)
    assert "facebook/opt-350m" in msg and "'main'" in msg and cache in msg and "HF_HUB_OFFLINE=1" in msg
    with pytest.raises(FileNotFoundError, match=rf"{REPO} \(revision 'nope'\).*{cache}"):
        hub.resolve_pretrained(REPO, revision="nope")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(FileNotFoundError, match="local_files_only=True"):
        hub.resolve_pretrained("facebook/opt-350m", local_files_only=True)


def test_without_huggingface_hub_an_id_names_the_extra(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(hub.HubUnavailableError, match=r"pip install 'optkit\[hub\]'"):
        hub.resolve_pretrained(REPO)
    assert hub.resolve_pretrained(str(offline["main"])) == str(offline["main"])  # folders need no hub


def test_only_the_needed_files_are_fetched():
    repo = ["config.json", "generation_config.json", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
            "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "README.md",
            "LICENSE.md", ".gitattributes"]  # facebook/opt-125m's files
    small = ["config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
             "special_tokens_map.json"]
    assert hub.files_to_fetch(repo) == small + ["pytorch_model.bin"]
    assert hub.files_to_fetch(repo + ["model.safetensors"]) == small + ["model.safetensors"]
    assert hub.files_to_fetch(repo, weights=False) == small
    shards = ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"]
    assert hub.files_to_fetch(["config.json", "model.safetensors.index.json", *shards, "pytorch_model.bin"]) == [
        "config.json", "model.safetensors.index.json", *sorted(shards)]
    assert hub.files_to_fetch(["config.json", "tf_model.h5", "flax_model.msgpack"]) == ["config.json", "tf_model.h5"]


def test_online_lists_the_repo_then_downloads_only_those_files(hub_cache, monkeypatch):
    """The online path's calls into huggingface_hub, with the network replaced by stand-ins."""
    import huggingface_hub
    import requests

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls, snapshot = [], "0" * 40
    listing = ["config.json", "pytorch_model.bin", "model.safetensors", "vocab.json", "merges.txt", "README.md"]

    class Api:
        def __init__(self, token=None):
            calls.append(("api", token))

        def list_repo_files(self, repo_id, revision=None):
            calls.append(("list", repo_id, revision))
            if repo_id == "offline/model":
                raise requests.ConnectionError("no route to host")
            return listing

    def download(repo_id, revision=None, cache_dir=None, token=None, allow_patterns=None, local_files_only=False):
        calls.append(("download", repo_id, revision, cache_dir, allow_patterns, local_files_only))
        if local_files_only:
            raise huggingface_hub.utils.LocalEntryNotFoundError("not cached")
        return os.path.join(cache_dir, f"models--{repo_id.replace('/', '--')}", "snapshots", snapshot)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert hub.resolve_pretrained(REPO, revision="v2", cache_dir="/c", token="t") == \
        f"/c/models--{REPO.replace('/', '--')}/snapshots/{snapshot}"
    assert calls == [("api", "t"), ("list", REPO, "v2"),
                     ("download", REPO, "v2", "/c", ["config.json", "vocab.json", "merges.txt", "model.safetensors"],
                      False)]
    calls.clear()
    hub.resolve_pretrained(REPO, cache_dir="/c", weights=False)
    assert calls[-1][4] == ["config.json", "vocab.json", "merges.txt"] and calls[-1][2] == "main"
    # no connection: the cache is tried, and its absence is an error naming the id and the failure
    with pytest.raises(hub.HubModelNotFoundError, match=r"offline/model .*could not be reached \(ConnectionError"):
        hub.resolve_pretrained("offline/model", cache_dir="/c")
    assert calls[-1] == ("download", "offline/model", "main", "/c", None, True)
    # what huggingface_hub gives must be a snapshot of that repository: it joins refs/<revision>'s text as it is
    snapshot = "../../../elsewhere"
    with pytest.raises(hub.HubModelNotFoundError, match="which is not a snapshot of it"):
        hub.resolve_pretrained(REPO, cache_dir="/c")


def test_resolving_an_id_imports_no_framework(offline):
    code = ("import sys; from opt_spec.hub import resolve_pretrained; from opt_spec import OPTConfig; "
            f"p = resolve_pretrained({REPO!r}); OPTConfig.from_pretrained({REPO!r}); "
            "bad = {'torch', 'tensorflow', 'jax', 'flax', 'keras'} & set(sys.modules); "
            "assert not bad, bad; print(p)")
    env = dict(os.environ, HF_HUB_CACHE=str(offline["cache"]), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == snapshot(offline, "main")


# -------------------------------------------------------------------------------- config and tokenizer
def test_config_and_tokenizer_from_an_id(offline):
    from opt_spec.tokenizer import OPTTokenizer

    assert OPTConfig.from_pretrained(REPO).init_std == 0.02
    assert OPTConfig.from_pretrained(REPO, revision="v2").init_std == 0.03
    assert OPTConfig.from_pretrained(REPO) == OPTConfig.from_pretrained(offline["main"])
    ours, local = OPTTokenizer.from_pretrained(REPO, revision="v2"), OPTTokenizer.from_pretrained(offline["v2"])
    text = "Hello, my name is Ada."
    assert ours.encode(text) == local.encode(text) and ours.encode(text)[0] == 2 and len(ours.encode(text)) < len(text)
    with pytest.raises(FileNotFoundError, match="facebook/opt-350m"):
        OPTTokenizer.from_pretrained("facebook/opt-350m")
    with pytest.raises(FileNotFoundError, match="facebook/opt-350m"):
        OPTConfig.from_pretrained("facebook/opt-350m")


def test_hugging_face_reads_the_same_cache_to_the_same_ids(offline):
    """transformers' own loader on the hand-made cache: the layout is the real one, and both tokenizers agree."""
    transformers = pytest.importorskip("transformers")
    from opt_spec.tokenizer import OPTTokenizer

    theirs = transformers.AutoTokenizer.from_pretrained(REPO, cache_dir=offline["cache"], local_files_only=True)
    ours = OPTTokenizer.from_pretrained(REPO, cache_dir=offline["cache"], local_files_only=True)
    for text in ["Hello, my name is Ada.", "The quick brown fox", "zebra quiz 🙂"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text


# ---------------------------------------------------------------------------------------------- backends
def hf_logits(offline, revision):
    """transformers' PyTorch OPT on the same cached snapshot: the reference logits."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.OPTForCausalLM.from_pretrained(REPO, revision=revision, cache_dir=offline["cache"],
                                                        local_files_only=True)
    with torch.no_grad():
        return model(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def check_logits(logits, offline, revision):
    expected = hf_logits(offline, revision)
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=1e-4, rtol=1e-4)


def test_torch_loads_an_id_and_its_revisions(offline):
    torch = pytest.importorskip("torch")
    from opt_torch import OPTForCausalLM, OPTForSequenceClassification

    ids, mask = torch.tensor(IDS), torch.tensor(MASK)
    with torch.no_grad():
        main = OPTForCausalLM.from_pretrained(REPO)(ids, attention_mask=mask).logits
        v2 = OPTForCausalLM.from_pretrained(REPO, revision="v2")(ids, attention_mask=mask).logits
    check_logits(main, offline, "main")
    check_logits(v2, offline, "v2")
    assert not np.allclose(main.numpy(), v2.numpy())
    with pytest.warns(UserWarning, match="score.weight"):  # a head: the base weights from the id, a fresh score
        clf = OPTForSequenceClassification.from_pretrained(REPO, cache_dir=offline["cache"], local_files_only=True)
    local = OPTForCausalLM.from_pretrained(offline["main"])
    torch.testing.assert_close(clf.model.decoder.embed_tokens.weight, local.model.decoder.embed_tokens.weight)


def test_tf_loads_an_id_and_its_revisions(offline, monkeypatch):
    pytest.importorskip("tensorflow")
    from opt_tf import TFOPTForCausalLM, TFOPTForSequenceClassification

    monkeypatch.delenv("HF_HUB_CACHE")  # cache_dir as an argument
    main = TFOPTForCausalLM.from_pretrained(REPO, cache_dir=offline["cache"])
    v2 = TFOPTForCausalLM.from_pretrained(REPO, revision="v2", cache_dir=offline["cache"])
    check_logits(main(IDS, attention_mask=MASK).logits, offline, "main")
    check_logits(v2(IDS, attention_mask=MASK).logits, offline, "v2")
    with pytest.warns(UserWarning, match="score"):
        clf = TFOPTForSequenceClassification.from_pretrained(REPO, revision="v2", cache_dir=offline["cache"])
    assert clf(IDS, attention_mask=MASK).logits.shape == (2, 2)


def test_flax_loads_an_id_and_its_revisions(offline):
    pytest.importorskip("flax")
    from opt_flax import FlaxOPTForCausalLM, FlaxOPTForQuestionAnswering

    main = FlaxOPTForCausalLM.from_pretrained(REPO)
    v2 = FlaxOPTForCausalLM.from_pretrained(REPO, revision=COMMITS["v2"])
    check_logits(main(IDS, attention_mask=MASK).logits, offline, "main")
    check_logits(v2(IDS, attention_mask=MASK).logits, offline, "v2")
    with pytest.warns(UserWarning, match="qa_outputs"):
        qa = FlaxOPTForQuestionAnswering.from_pretrained(REPO)
    assert qa(IDS, attention_mask=MASK).start_logits.shape == IDS.shape


def test_backends_name_an_uncached_id(offline):
    pytest.importorskip("torch")
    from opt_torch import OPTForCausalLM

    with pytest.raises(FileNotFoundError, match=rf"facebook/opt-350m .*'main'.*{offline['cache']}"):
        OPTForCausalLM.from_pretrained("facebook/opt-350m")


# --------------------------------------------------------------------------------------------------- CLI
def run_main(capsys, *args):
    from optkit_cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_and_parity_on_an_id(offline, capsys, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("OPTKIT_CACHE", str(tmp_path / "optkit-cache"))
    args = ["--backend", "torch", "--max-new-tokens", "5", "Hello, my name is"]
    code, from_id, err = run_main(capsys, "generate", "--model", REPO, "--revision", "v2", *args)
    assert code == 0, err
    assert REPO in err and COMMITS["v2"] in err  # says which snapshot it runs
    code, from_folder, err = run_main(capsys, "generate", "--model", offline["v2"], *args)
    assert code == 0, err
    assert from_id == from_folder and from_id.strip()
    code, out, err = run_main(capsys, "parity", "--model", REPO, "--backends", "torch", "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert report["hub_id"] == REPO and report["model"] == snapshot(offline, "main") and report["passed"]
    code, _, err = run_main(capsys, "generate", "--model", "facebook/opt-350m", "2 3")
    assert code == 2 and "facebook/opt-350m" in err and str(offline["cache"]) in err and "Traceback" not in err


def test_cli_convert_from_an_id(offline, capsys, tmp_path):
    from opt_spec.io import load_checkpoint_dir

    dst = tmp_path / "converted"
    code, out, err = run_main(capsys, "convert", REPO, dst, "--revision", "v2", "--quiet")
    assert code == 0, err
    got, expected = load_checkpoint_dir(dst), load_checkpoint_dir(offline["v2"])
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    code, _, err = run_main(capsys, "convert", "facebook/opt-350m", tmp_path / "x")
    assert code == 1 and "facebook/opt-350m" in err and not (tmp_path / "x").exists()


def test_cli_train_on_an_id(offline, capsys, tmp_path):
    pytest.importorskip("torch")
    text = tmp_path / "train.txt"
    text.write_text("Hello, my name is Ada. The quick brown fox jumps over the lazy dog.\n" * 4, encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "train", "--model", REPO, "--task", "causal_lm", "--data", text,
                            "--backend", "torch", "--output", out, "--steps", 1, "--batch-size", 2, "--seq-len", 8,
                            "-q")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1]
    assert (out / "final" / "vocab.json").read_bytes() == (offline["main"] / "vocab.json").read_bytes()


def test_only_an_adapters_files_are_fetched_for_one():
    repo = ["adapter_config.json", "adapter_model.bin", "adapter_model.safetensors", "README.md", "config.json"]
    assert hub.files_to_fetch(repo, adapter=True) == ["adapter_config.json", "adapter_model.safetensors"]
    assert hub.files_to_fetch(repo[:2], adapter=True) == ["adapter_config.json", "adapter_model.bin"]


def test_torch_loads_an_adapter_by_id(offline, tmp_path):
    """load_adapter("someone/opt-lora") reads the adapter's snapshot from the cache (its files are blob
    symlinks there) and gives what the same folder gives; an id the cache lacks is named."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from opt_torch import OPTForCausalLM

    torch.manual_seed(0)
    lora = peft.get_peft_model(OPTForCausalLM.from_pretrained(REPO), peft.LoraConfig(r=2, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "README.md").unlink()
    lay_out_hub_cache(tmp_path / "cache", "someone/opt-lora", {"main": ("c" * 40, tmp_path / "lora")})
    by_id, by_folder = OPTForCausalLM.from_pretrained(REPO), OPTForCausalLM.from_pretrained(REPO)
    by_id.load_adapter("someone/opt-lora", cache_dir=tmp_path / "cache")
    by_folder.load_adapter(tmp_path / "lora")
    ids, mask = torch.tensor(IDS), torch.tensor(MASK)
    with torch.no_grad():
        got = by_id(ids, attention_mask=mask).logits
        assert torch.equal(got, by_folder(ids, attention_mask=mask).logits)
        assert not torch.allclose(got, OPTForCausalLM.from_pretrained(REPO)(ids, attention_mask=mask).logits)
    with pytest.raises(hub.HubModelNotFoundError, match="someone/other-lora"):
        by_folder.load_adapter("someone/other-lora", adapter_name="other", cache_dir=tmp_path / "cache")
