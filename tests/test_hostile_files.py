"""Hostile files besides the weights: the tokenizer's files, generation_config.json, a trainer checkpoint's
state and training data. Each attack is built here from a small valid file and must be refused with an error
naming the file and the entry (CheckpointError, or DataError for data), never read outside the folder, never
allocate without bound, never load silently wrong; the valid files next to them still load.
"""

import base64
import copy
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from opt_spec import data as spec_data
from opt_spec import io as spec_io
from opt_spec import training as spec_training
from opt_spec.errors import CheckpointError, ConfigError
from opt_spec.generation import MAX_ROWS_PER_PROMPT, GenerationConfig
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_spec.training import TrainConfig

tokenizers = pytest.importorskip("tokenizers")

from opt_spec.tokenizer import OPTTokenizer  # noqa: E402

CONFIG = VARIANTS["pre_ln"]  # vocab 96
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory):
    """{name: bytes} of a small byte-level BPE tokenizer with OPT's special ids, in both file formats."""
    from tokenizers import Tokenizer

    from tests.test_data import build_tokenizer

    root = tmp_path_factory.mktemp("tok")
    build_tokenizer(root)  # tokenizer.json, 300 tokens
    Tokenizer.from_file(str(root / "tokenizer.json")).model.save(str(root))  # vocab.json + merges.txt
    (root / "tokenizer_config.json").write_text(json.dumps({"padding_side": "left"}))
    (root / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return {name: (root / name).read_bytes() for name in TOKENIZER_FILES}


def _folder(path, files: dict) -> str:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return str(path)


# ------------------------------------------------------------------------------ 1. tokenizer files
@pytest.mark.parametrize("name", [*TOKENIZER_FILES, "config.json"])
def test_tokenizer_files_may_not_be_symlinks_out(tmp_path, tok_files, name):
    files = dict(tok_files, **{"config.json": CONFIG.to_json_string().encode()})
    if name in ("vocab.json", "merges.txt"):
        del files["tokenizer.json"]  # the BPE pair is read only without tokenizer.json
    folder = _folder(tmp_path / "ckpt", files)
    assert OPTTokenizer.from_pretrained(folder).encode("Hello")[0] == 2
    (tmp_path / "secret").mkdir()
    os.replace(os.path.join(folder, name), tmp_path / "secret" / name)  # the same bytes, outside: read before
    os.symlink(tmp_path / "secret" / name, os.path.join(folder, name))
    with pytest.raises(CheckpointError, match=f"'{name}'.*outside the checkpoint folder"):
        OPTTokenizer.from_pretrained(folder)


def test_a_hub_cache_snapshot_of_tokenizer_files_still_loads(tmp_path, tok_files):
    repo = tmp_path / "models--facebook--opt-tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, data in tok_files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / name)
    ours = OPTTokenizer.from_pretrained(snapshot)
    plain = OPTTokenizer.from_pretrained(_folder(tmp_path / "plain", tok_files))
    assert ours.encode("The quick brown fox") == plain.encode("The quick brown fox")


COMPONENT_ATTACKS = {
    # a backtracking pattern: exponential time, then the library panics (an exception `except Exception` misses)
    "regex": ("pre_tokenizer", lambda old: {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}, old]}, "'Split'"),
    # a charsmap states its own size: these 2 KB asked for 4 GB (Rust aborts the process when that fails)
    "charsmap": ("normalizer", lambda old: {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(
        np.random.default_rng(0).bytes(2000)).decode()}, "'Precompiled'"),
    "untyped": ("pre_tokenizer", lambda old: {"pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated"}, "None"),
    "replace-decoder": ("decoder", lambda old: {"type": "Replace", "pattern": {"Regex": "(a|a)+b"}, "content": ""},
                        "'Replace'"),
}


@pytest.mark.parametrize("attack", list(COMPONENT_ATTACKS))
def test_tokenizer_json_may_hold_only_opts_components(tmp_path, tok_files, attack):
    """tokenizer.json is read as OPT's byte-level BPE only (TOKENIZER_COMPONENTS): other components are
    programs the tokenizers library runs from the file, without bounds."""
    key, change, words = COMPONENT_ATTACKS[attack]
    data = json.loads(tok_files["tokenizer.json"])
    data[key] = change(data[key])
    folder = _folder(tmp_path / "ckpt", {"tokenizer.json": json.dumps(data).encode()})
    with pytest.raises(CheckpointError, match=f"tokenizer.json: {key} {words} is not part of OPT's byte-level BPE"):
        OPTTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", ["tokenizer.json", "merges.txt"])
def test_tokenizer_files_are_bounded_before_parsing(tmp_path, tok_files, name):
    """The tokenizers library takes ~18x a tokenizer.json's size in memory: a file over the JSON limit is
    refused by its size (merges.txt alike), before anything parses it."""
    files = dict(tok_files)
    if name == "merges.txt":
        del files["tokenizer.json"]
    folder = _folder(tmp_path / "ckpt", files)
    with open(os.path.join(folder, name), "ab") as f:
        f.truncate(spec_io.MAX_JSON_BYTES + 1)  # a sparse file: nothing is written
    with pytest.raises(CheckpointError, match=f"{name}: 8,388,609 bytes"):
        OPTTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("key,value", [("bos_token_id", "2"), ("eos_token_id", [2, 3]), ("pad_token_id", -5),
                                       ("pad_token_id", 10**30), ("bos_token_id", True), ("pad_token_id", 1e308),
                                       ("eos_token_id", 300)])
def test_special_ids_from_config_json_must_be_tokens(tmp_path, tok_files, key, value):
    folder = _folder(tmp_path / "ckpt", tok_files)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "opt", key: value}))
    with pytest.raises(CheckpointError, match=rf"config.json: {key}=.* is not a token id of this tokenizer "
                                              r"\(an int in \[0, 300\)\)"):
        OPTTokenizer.from_pretrained(folder)


def test_train_copies_no_tokenizer_file_from_outside_the_model_folder(tmp_path, tok_files, capsys):
    """merges.txt is not read when tokenizer.json is there, but `optkit train` copied every tokenizer file
    into each checkpoint: a `merges.txt -> secret` put the secret into checkpoints meant for sharing."""
    from optkit_cli.main import main

    model = _folder(tmp_path / "model", tok_files)
    config = CONFIG.replace(vocab_size=304)
    spec_io.save_safetensors_dir(model, random_weights(config), config.to_dict())
    (tmp_path / "secret").write_text("the key\n")
    os.replace(os.path.join(model, "merges.txt"), tmp_path / "merges.txt")
    os.symlink(tmp_path / "secret", os.path.join(model, "merges.txt"))
    (tmp_path / "data.txt").write_text("Hello, my name is Ada. The quick brown fox.\n" * 4)
    code = main(["train", "--model", model, "--task", "causal_lm", "--data", str(tmp_path / "data.txt"),
                 "--backend", "torch", "--output", str(tmp_path / "out"), "--steps", "1", "--seq-len", "8", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "merges.txt" in err and "outside the checkpoint folder" in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ 2. generation_config.json
@pytest.mark.parametrize("settings", [{"num_beams": 10**8}, {"do_sample": True, "num_return_sequences": 10**8}])
def test_generation_config_cannot_ask_for_unbounded_rows(tmp_path, settings):
    """Each decoding row holds a cache: num_beams=10**8 made generate ask torch for 150 GB."""
    from opt_torch import OPTForCausalLM

    spec_io.save_safetensors_dir(tmp_path, random_weights(CONFIG), CONFIG.to_dict())
    (tmp_path / "generation_config.json").write_text(json.dumps(settings))
    key = next(k for k in settings if k != "do_sample")
    with pytest.raises(ConfigError, match=rf"generation_config.json: {key}=100000000: is more than optkit's maximum"):
        OPTForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({**settings, key: MAX_ROWS_PER_PROMPT}))
    assert getattr(OPTForCausalLM.from_pretrained(tmp_path).generation_config, key) == MAX_ROWS_PER_PROMPT
    # the bound is a file's: a call sizes its own batch, and Hugging Face takes any number (pass@k sampling)
    assert GenerationConfig(**{**settings, key: 1000}).validate() is None


def test_beam_search_with_more_eos_ids_than_continuations_is_refused_in_words(tmp_path):
    from opt_torch import OPTForCausalLM

    spec_io.save_safetensors_dir(tmp_path, random_weights(CONFIG), CONFIG.to_dict())
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 2, "eos_token_id": [2] * 1000}))
    model = OPTForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="1000 eos_token_id entries keeps 2002 candidates a step, more than the 192"):
        model.generate(torch.tensor([[2, 5, 6]]), max_new_tokens=2)
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 2, "eos_token_id": [2, 3]}))
    assert OPTForCausalLM.from_pretrained(tmp_path).generate(torch.tensor([[2, 5, 6]]), max_new_tokens=2).shape[0] == 1


# ------------------------------------------------------------------------------ 3. trainer checkpoints
RESUME_ATTACKS = {
    # name: (change to trainer_state.pt's dict, words in the message)
    "negative-step": (lambda s: s.update(step=-5), "step=-5 is not a number of updates"),
    "float-step": (lambda s: s.update(step=1e300), "step=1e+300"),
    "task-list": (lambda s: s.update(task=["causal_lm"]), "task=['causal_lm'] is not one of"),
    "train-config-list": (lambda s: s.update(train_config=[1]), "train_config is not valid (a list, not a mapping)"),
    "train-config-unknown": (lambda s: s["train_config"].update(bogus=1), "'bogus'"),
    "train-config-inf": (lambda s: s["train_config"].update(learning_rate=float("inf")), "must be a finite number"),
    "missing-step": (lambda s: s.pop("step"), "not a trainer state"),
    "moment-broadcast": (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(1)),
                         "state[0]['exp_avg'] is (1,) torch.float32; its parameter is (96, 32)"),
    "moment-float64": (lambda s: s["optimizer"]["state"][0].update(exp_avg_sq=torch.zeros(96, 32, dtype=torch.float64)),
                       "torch.float64"),
    "adam-count": (lambda s: s["optimizer"]["state"][0].update(step=torch.tensor(-1e30)),
                   "not a count of updates in [1, 1]"),
    "adam-count-ahead": (lambda s: s["optimizer"]["state"][0].update(step=torch.tensor(2.0)),
                         "not a count of updates in [1, 1]"),
    "foreign-parameter": (lambda s: s["optimizer"]["state"].update({999: s["optimizer"]["state"][0]}),
                          "holds the state of parameters this trainer does not have"),
    "float-parameter-number": (lambda s: s["optimizer"]["state"].update({0.0: s["optimizer"]["state"].pop(0)}),
                               "holds the state of parameters this trainer does not have"),
    "rng": (lambda s: s.update(rng_cpu=torch.zeros(3, dtype=torch.uint8)), "rng_cpu[0] is not a CPU generator state"),
    # a tensor where a list belongs: its truth value is a RuntimeError, which escaped as an internal error
    "rng-dp-tensor": (lambda s: s.update(rng_cpu_dp=torch.zeros(2)), "rng_cpu_dp is not a list of generator states"),
    "rng-cuda-tensor": (lambda s: s.update(rng_cuda=torch.zeros(2)), "rng_cuda is not a list of generator states"),
}


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
    """(folder, trainer_state.pt's dict, TrainConfig, batch) of a torch trainer saved after one update."""
    from opt_torch.training import STATE_FILE, Trainer

    root = tmp_path_factory.mktemp("resume")
    spec_io.save_safetensors_dir(root / "src", random_weights(CONFIG, "causal_lm"), CONFIG.to_dict())
    cfg = TrainConfig(learning_rate=1e-3, total_steps=10, warmup_steps=2)
    ids, mask = random_batch(CONFIG, batch=2, length=8, seed=1)
    batch = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
             "labels": np.where(mask == 1, ids, -100).astype(np.int64)}
    trainer = Trainer.from_pretrained(root / "src", "causal_lm", cfg)
    trainer.train_step(batch)
    trainer.save_checkpoint(root / "good")
    return root / "good", torch.load(root / "good" / STATE_FILE, weights_only=True), cfg, batch


def _resave(torch_checkpoint, tmp_path, change) -> str:
    from opt_torch.training import STATE_FILE

    good, state, _, _ = torch_checkpoint
    shutil.copytree(good, tmp_path / "ckpt")
    state = copy.deepcopy(state)
    change(state)
    torch.save(state, tmp_path / "ckpt" / STATE_FILE)
    return str(tmp_path / "ckpt")


@pytest.mark.parametrize("attack", list(RESUME_ATTACKS))
def test_torch_trainer_state_is_checked_before_it_is_used(tmp_path, torch_checkpoint, attack):
    from opt_torch.training import Trainer

    change, words = RESUME_ATTACKS[attack]
    folder = _resave(torch_checkpoint, tmp_path, change)
    with pytest.raises(CheckpointError) as err:
        Trainer.from_checkpoint(folder)
    assert folder in str(err.value) and words in str(err.value), str(err.value)  # the folder or its trainer_state.pt


def test_torch_resume_takes_its_schedule_and_adam_settings_from_the_train_config(tmp_path, torch_checkpoint):
    """The file's scheduler position and param_groups settings were loaded as they were: last_epoch=-50 made
    the learning rate negative, betas=(5, -3) or weight_decay=1e9 changed every later update silently."""
    from opt_torch.training import Trainer

    def change(s):
        s["scheduler"].update(last_epoch=-50)
        for group in s["optimizer"]["param_groups"]:
            group.update(betas=(5.0, -3.0), weight_decay=1e9, eps=1.0)

    _, _, cfg, batch = torch_checkpoint
    trainer = Trainer.from_checkpoint(_resave(torch_checkpoint, tmp_path, change))
    assert trainer.step == 1 and trainer.train_step(batch)["learning_rate"] == spec_training.learning_rate(1, cfg) > 0
    for group in trainer.optimizer.param_groups:
        assert group["betas"] == (cfg.adam_beta1, cfg.adam_beta2) and group["eps"] == cfg.adam_epsilon
        assert group["weight_decay"] in (cfg.weight_decay, 0.0)
    os.replace(tmp_path / "ckpt" / "trainer_state.pt", tmp_path / "elsewhere.pt")
    os.symlink(tmp_path / "elsewhere.pt", tmp_path / "ckpt" / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Trainer.from_checkpoint(tmp_path / "ckpt")


def test_torch_split_optimizer_state_gets_the_same_checks(tmp_path, torch_checkpoint):
    """trainer_state.dcp (a split trainer's optimizer state, resumable on one process) carried its own
    param_groups settings and step counters into the optimizer as well."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from opt_torch.training import DCP_DIR, STATE_FILE, Trainer

    good, state, cfg, _ = torch_checkpoint
    trainer = Trainer.from_checkpoint(good)
    template = get_optimizer_state_dict(trainer.model, trainer.optimizer)

    def folder(name, change):
        shutil.copytree(good, tmp_path / name)
        optimizer = copy.deepcopy(template)
        change(optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP without a process group says so
            dcp.save({"optimizer": optimizer}, checkpoint_id=tmp_path / name / DCP_DIR)
        torch.save({**{k: v for k, v in state.items() if k != "optimizer"}, "optimizer_dcp": DCP_DIR},
                   tmp_path / name / STATE_FILE)
        return tmp_path / name

    def settings(optimizer):
        for group in optimizer["param_groups"]:
            group.update(betas=(5.0, -3.0), weight_decay=1e9)

    resumed = Trainer.from_checkpoint(folder("settings", settings))
    assert all(g["betas"] == (cfg.adam_beta1, cfg.adam_beta2) for g in resumed.optimizer.param_groups)
    first = next(iter(template["state"]))
    with pytest.raises(CheckpointError, match="optimizer_dcp holds AdamW state whose step counters are not counts"):
        Trainer.from_checkpoint(folder("count", lambda o: o["state"][first].update(step=torch.tensor(-1e30))))


def test_flax_trainer_counts_must_be_the_checkpoint_step(tmp_path):
    """optax's counts decide Adam's bias correction and the schedule's rate: the msgpack reader checked
    their shapes and dtypes only, so a count of -5 loaded."""
    flax_serialization = pytest.importorskip("flax.serialization")
    import jax

    from opt_flax.training import INFO_FILE, STATE_FILE, FlaxTrainer

    spec_io.save_safetensors_dir(tmp_path / "src", random_weights(CONFIG, "causal_lm"), CONFIG.to_dict())
    trainer = FlaxTrainer.from_pretrained(tmp_path / "src", "causal_lm", TrainConfig(total_steps=4))
    trainer.step = 3  # as after three updates (optax counts alike); the update itself is not what is tested
    trainer.opt_state = jax.tree_util.tree_map(
        lambda x: x._replace(count=np.int32(3)) if "count" in getattr(x, "_fields", ()) else x, trainer.opt_state,
        is_leaf=lambda x: "count" in getattr(x, "_fields", ()))
    trainer.save_checkpoint(tmp_path / "ckpt")
    assert FlaxTrainer.from_checkpoint(tmp_path / "ckpt").step == 3
    path = tmp_path / "ckpt" / STATE_FILE
    state = flax_serialization.msgpack_restore(path.read_bytes())
    state["opt_state"]["1"]["count"] = np.int32(-5)
    path.write_bytes(flax_serialization.msgpack_serialize(state))
    with pytest.raises(CheckpointError, match=r"trainer_state.msgpack: entry \[1\].count is -5, not the checkpoint's"):
        FlaxTrainer.from_checkpoint(tmp_path / "ckpt")
    info = json.loads((tmp_path / "ckpt" / INFO_FILE).read_text())
    (tmp_path / "ckpt" / INFO_FILE).write_text(json.dumps(dict(info, step=-1)))
    with pytest.raises(CheckpointError, match="trainer_state.json: step=-1"):
        FlaxTrainer.from_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("info,words", [
    ({"task": "causal_lm", "step": True, "train_config": {}}, "state.json: step=True"),
    ({"task": {}, "step": 0, "train_config": {}}, "state.json: task={}"),
    ({"task": "causal_lm", "step": 2**31, "train_config": {}}, "state.json: step=2147483648"),
    ({"task": "causal_lm", "step": 0, "train_config": {"seed": -1}}, "ckpt: the saved train_config is not valid"),
    ({"task": "causal_lm", "step": 0, "train_config": {"weight_decay": "x"}}, "ckpt: the saved train_config"),
])
def test_resume_info_is_the_one_check_of_every_backend(info, words):
    with pytest.raises(CheckpointError) as err:
        spec_training.resume_info(info, "state.json", "ckpt", None)
    assert str(err.value).startswith(words), str(err.value)
    fine = {"task": "causal_lm", "step": 7, "train_config": {}}
    assert spec_training.resume_info(fine, "x", "ckpt", None) == ("causal_lm", 7, TrainConfig())


# ------------------------------------------------------------------------------ 4. training data
@pytest.mark.parametrize("line,words", [
    (b'{"text": "a", "label": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deep"),
    (b'{"text": "a", "label": ' + b"9" * 5000 + b"}", "4300 digits"),
    (b'{"text": "a", "label": NaN}', "NaN is not a JSON number"),
    (b'{"text": "a", "label": 1e999}', "'label' is inf, not a finite number"),
    (b'{"text": "\\ud800 a", "label": 1}', "'text' holds a lone surrogate (U+D800 at character 0)"),
    (b'{"text": "a", "label": 99999999999999999999}', "outside [0, 65536)"),
])
def test_bad_jsonl_lines_are_data_errors(tmp_path, tok_files, line, words):
    tokenizer = OPTTokenizer.from_pretrained(_folder(tmp_path / "tok", tok_files))
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "fine", "label": 0}\n' + line + b"\n")
    with pytest.raises(spec_data.DataError) as err:
        spec_data.load_classification(tmp_path / "d.jsonl", tokenizer, 16)
    assert str(err.value).startswith(f"{tmp_path / 'd.jsonl'}:2: ") and words in str(err.value), str(err.value)


# ------------------------------------------------------------------------------ 5. the hub cache's refs
def test_hub_refs_and_revisions_cannot_point_out_of_the_cache(tmp_path, monkeypatch):
    """huggingface_hub joins refs/<revision>'s text to snapshots/ as it is: a ref holding '../../..' or an
    absolute path loaded whatever folder it named; a revision argument with '..' read refs/../<anything>."""
    pytest.importorskip("huggingface_hub")
    from opt_spec.hub import HubModelNotFoundError, resolve_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "cache" / "models--facebook--opt-x"
    snapshot = repo / "snapshots" / ("a" * 40)
    spec_io.save_safetensors_dir(snapshot, random_weights(CONFIG), CONFIG.to_dict())
    spec_io.save_safetensors_dir(tmp_path / "outside", random_weights(CONFIG), CONFIG.to_dict())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_pretrained("facebook/opt-x", cache_dir=tmp_path / "cache") == str(snapshot)
    for ref in ("../../../outside", str(tmp_path / "outside")):
        (repo / "refs" / "main").write_text(ref)
        with pytest.raises(HubModelNotFoundError, match="which is not a snapshot of it"):
            resolve_pretrained("facebook/opt-x", cache_dir=tmp_path / "cache")
    for revision in ("../../../outside", str(tmp_path / "outside"), "a/./b"):
        with pytest.raises(HubModelNotFoundError, match="is not a branch, tag or commit name"):
            resolve_pretrained("facebook/opt-x", cache_dir=tmp_path / "cache", revision=revision)


# ------------------------------------------------------------------------------ 6. many tensors
def test_a_header_of_many_tiny_tensors_is_refused_in_a_short_message(tmp_path):
    """8 MiB of header holds ~120,000 one-byte tensors: the load stays bounded (measured: ~310 MB, 4 s
    through torch), and the refusal used to list every name, a 1 MB line; it names the first few."""
    from opt_spec.weights import SHOWN_NAMES, WeightMismatchError, check_weights

    weights = {n: a.shape for n, a in random_weights(CONFIG).items()}
    names = [f"x{i:06d}" + "y" * 1000 for i in range(5000)]
    with pytest.raises(WeightMismatchError) as err:
        check_weights({**weights, **{n: (1,) for n in names}}, CONFIG, where="ckpt")
    message = str(err.value)
    assert "unexpected (5000): x000000" in message and f"({5000 - SHOWN_NAMES} more)" in message
    assert len(message) < 6000 and len(err.value.unexpected) == 5000


# ------------------------------------------------------------------------------ 7. a tokenizer larger than the model
def test_train_refuses_a_tokenizer_with_more_tokens_than_the_model(tmp_path, tok_files, capsys):
    """Token ids past the embedding: torch stopped with an internal error, Flax trained on NaN (XLA's
    lookup past the table) and saved the NaN weights with exit 0."""
    from optkit_cli.main import main

    model = _folder(tmp_path / "model", tok_files)
    spec_io.save_safetensors_dir(model, random_weights(CONFIG), CONFIG.to_dict())  # 96 rows, 300 tokens
    (tmp_path / "data.txt").write_text("Hello, my name is Ada. The quick brown fox.\n" * 4)
    code = main(["train", "--model", model, "--task", "causal_lm", "--data", str(tmp_path / "data.txt"),
                 "--backend", "flax", "--output", str(tmp_path / "out"), "--steps", "1", "--seq-len", "8", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "has 300 tokens but the model only 96" in err, err
    assert not (tmp_path / "out").exists()


def test_flax_trainer_checks_token_ids_on_the_host(tmp_path):
    pytest.importorskip("flax")
    from opt_flax.training import FlaxTrainer

    spec_io.save_safetensors_dir(tmp_path, random_weights(CONFIG, "causal_lm"), CONFIG.to_dict())
    trainer = FlaxTrainer.from_pretrained(tmp_path, "causal_lm", TrainConfig(total_steps=2))
    ids = np.array([[2, 5, 500, 7]], np.int64)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    with pytest.raises(ValueError, match=r"token id 500 at batch row 0, position 2 is outside the vocabulary"):
        trainer.train_step(batch)


def test_tf_trainer_state_json_is_checked_before_anything_is_built(tmp_path):
    pytest.importorskip("tensorflow")
    from opt_tf.training import INFO_FILE, OPTIMIZER_FILE, TFTrainer

    (tmp_path / OPTIMIZER_FILE).write_bytes(b"")
    info = {"backend": "tf", "task": "causal_lm", "step": -1, "train_config": {}}
    (tmp_path / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="trainer_state.json: step=-1 is not a number of updates"):
        TFTrainer.from_checkpoint(tmp_path)
    (tmp_path / INFO_FILE).write_text(json.dumps(dict(info, step=0, backend="torch")))
    with pytest.raises(CheckpointError, match="written by the 'torch' backend, not tf"):
        TFTrainer.from_checkpoint(tmp_path)
    os.replace(tmp_path / INFO_FILE, tmp_path.parent / "info-elsewhere.json")
    os.symlink(tmp_path.parent / "info-elsewhere.json", tmp_path / INFO_FILE)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        TFTrainer.from_checkpoint(tmp_path)
