"""PyTorch beyond one device (opt_torch.distributed) on CPU: the model split over torchrun processes (gloo)
against the same model in one process, trainer checkpoints resharded from dp=2 to one process, `optkit
train` under torchrun, and accelerate's device_map with disk offload.

Two torchrun launches (2 and 4 processes, tests/distributed_torch_checks.py) carry every multi-process
check, so that start-up is paid twice; the tests below read their measurements.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from opt_spec import io as spec_io  # noqa: E402
from opt_spec.testing import VARIANTS, random_batch, random_weights  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Hello, my name is Ada and I like tea.\n\nThe quick brown fox jumps over the lazy dog!\n" * 4
CLI_ARGS = ["--task", "causal_lm", "--backend", "torch", "--batch-size", "4", "--seq-len", "16", "--lr", "5e-3",
            "--warmup", "1", "--steps", "4", "--save-every", "2", "--eval-every", "2", "-q"]  # as the checks run it


def _launch(nproc: int, *args, timeout: int = 400) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tests.distributed_torch_checks", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    with open(os.path.join(args[1], "result.json")) as f:  # rank 0's file, not the ranks' shared stdout
        return json.load(f)["ranks"]


def _total_bytes(config) -> int:
    return sum(a.nbytes for a in random_weights(config, "causal_lm", 0).values())


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from opt_torch import OPTForCausalLM
    from tests.test_data import build_tokenizer

    path = tmp_path_factory.mktemp("tiny-cli")
    tok = build_tokenizer(path)
    config = VARIANTS["pre_ln"].replace(vocab_size=max(96, tok.vocab_size), max_position_embeddings=64)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(path)
    data = path / "train.txt"
    data.write_text(TEXT, encoding="utf-8")
    return path, data


@pytest.fixture(scope="module")
def two(tmp_path_factory, cli_model):
    work = tmp_path_factory.mktemp("torch-two")
    ranks = _launch(2, "two", work, *cli_model)
    return work, ranks


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _launch(4, "four", tmp_path_factory.mktemp("torch-four"))


def _check_lm(result: dict, config, tied: bool) -> None:
    """Split vs one process: logits and a cache step to float32 rounding, the same tokens, the exact
    weights back (state dict, save_pretrained), and the bytes the spec's table assigns to the rank."""
    assert result["logits"] < 1e-5 and result["cache_step"] < 1e-5, result
    assert result["greedy_equal"] and result["beam_equal"] and result["sampled_alike"], result
    assert result["state_exact"] and result["save_exact"], result
    assert result["tied"] is tied
    assert result["bytes_read"] == result["expected_bytes"] < _total_bytes(config), result


@pytest.mark.slow
def test_tensor_parallel_two_ranks_match_one_process(two):
    _, ranks = two
    for name in ("pre_ln", "untied_head", "post_ln_proj"):
        for r in ranks:
            result = r[f"tp2/{name}"]
            _check_lm(result, VARIANTS[name], tied=name != "untied_head")
            assert result["kv_heads"] == result["cache_heads"] == VARIANTS[name].num_attention_heads // 2
    grads = ranks[0]["tp2/grads"]
    assert grads["grad_names_equal"] and grads["grads"] < 1e-5 and grads["loss"] < 1e-5, grads
    assert ranks[0]["tp2/classifier"]["logits"] < 1e-5
    assert ranks[0]["tp2/built"]["logits"] < 1e-5 and ranks[0]["dp2/built"]["logits"] < 1e-5  # parallelize()
    assert ranks[0]["refusals"]["heads"].startswith("ValueError: cannot split this model with tp=2")
    assert "('dp', 'tp')" in ranks[0]["refusals"]["dims"]


@pytest.mark.slow
def test_fsdp_two_ranks_gradients_equal_one_process_on_the_whole_batch(two):
    _, ranks = two
    for r in ranks:
        _check_lm(r["dp2/lm"], VARIANTS["pre_ln"], tied=True)
        assert r["dp2/lm"]["logits"] == 0.0  # FSDP2 only gathers: the same products as one process
        assert r["dp2/lm"]["bytes_read"] == _total_bytes(VARIANTS["pre_ln"]) // 2  # every weight split in two
    # rows split unevenly in tokens; 3 rows (replicated); two micro-batches (FSDP2 reduces after the last)
    for key in ("dp2/grads", "dp2/grads_odd_batch", "dp2/grads_accumulated"):
        grads = ranks[0][key]
        assert grads["grad_names_equal"] and grads["grads"] < 1e-6 and grads["loss"] < 1e-6, (key, grads)
    fresh = ranks[0]["dp2/fresh_head"]  # a head the checkpoint lacks: one draw, split
    assert fresh["same_on_every_rank"] and abs(fresh["std"] - fresh["init_std"]) < 0.5 * fresh["init_std"], fresh


@pytest.mark.slow
def test_dp2_tp2_four_ranks_forward_and_gradients(four):
    for r in four:
        _check_lm(r["dp2tp2/lm"], VARIANTS["pre_ln"], tied=True)
    total = sum(r["dp2tp2/lm"]["bytes_read"] for r in four)
    assert total < 2 * _total_bytes(VARIANTS["pre_ln"])  # only what tp keeps whole (norms, biases) is read twice
    grads = four[0]["dp2tp2/grads"]
    assert grads["grad_names_equal"] and grads["grads"] < 1e-5 and grads["loss"] < 1e-5, grads
    # bf16 autocast rounds on both sides, in different places (the sums over tp too): differences of the
    # size of that rounding (one process with and without it; bfloat16's 8 bits for the loss)
    bf16 = four[0]["dp2tp2/grads_bf16"]
    assert bf16["grads"] < bf16["noise_grads"] and bf16["loss"] < 2 ** -7 * bf16["loss_value"], bf16


@pytest.mark.slow
def test_dcp_checkpoint_at_dp2_resumes_on_one_process_exactly(two):
    from opt_torch.training import DCP_DIR, Trainer

    work, ranks = two
    training = ranks[0]["dp2/training"]
    assert training["resume_same_mesh_differ"] == [] and training["resume_same_mesh_step"]
    assert training["resume_same_mesh_loss"] == 0.0
    ckpt = training["checkpoint"]
    assert sorted(f for f in os.listdir(os.path.join(ckpt, DCP_DIR)) if f.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]  # one file per rank

    trainer = Trainer.from_checkpoint(ckpt)  # no process group: DCP gathers the shards into one process
    saved = np.load(os.path.join(work, "state-2x1.npz"))
    assert trainer.step == 2
    state = trainer.model.state_dict()
    moments = {name: trainer.optimizer.state[p] for name, p in trainer.model.named_parameters()}
    for key in saved.files:
        kind, name = key.split("/", 1)
        if kind == "w":
            assert np.array_equal(state[name].numpy(), saved[key]), name
        else:
            name, field = name.rsplit("/", 1)
            assert np.array_equal(torch.as_tensor(moments[name][field]).numpy(), saved[key]), (name, field)
    with open(os.path.join(work, "batch3.json")) as f:
        batch = {k: np.asarray(v, dtype=np.int64) for k, v in json.load(f).items()}
    step3 = trainer.train_step(batch)
    assert abs(step3["loss"] - training["step3_loss"]) < 1e-5  # the same update as the dp=2 run's third


@pytest.mark.slow
def test_cli_train_under_torchrun_matches_one_process(two, cli_model, tmp_path, capsys):
    from optkit_cli.main import main

    _, ranks = two
    cli = ranks[0]["dp2/cli"]
    assert cli["code"] == 0 and ranks[1]["dp2/cli"]["code"] == 0 and cli["group_kept"]
    out = cli["output"]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    split = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 2, 3, 4, 4]  # rank 0 alone wrote them; evaluations at 2, 4
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "tokenizer.json"))
    # every rank wrote into rank 0's temporary sibling, renamed into place once all had finished
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "final", "metrics.jsonl"], os.listdir(out)
    assert os.path.isdir(os.path.join(out, "final", "trainer_state.dcp"))

    model, data = cli_model
    one = tmp_path / "one"
    args = ["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), *CLI_ARGS]
    assert main([*args, "--output", str(one)]) == 0
    single = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "grad_norm", "perplexity"):  # training steps, and evaluations on every rank
        np.testing.assert_allclose([r[key] for r in records if key in r], [r[key] for r in single if key in r],
                                   rtol=1e-5)
    assert [r["tokens"] for r in split] == [r["tokens"] for r in single if r["kind"] == "train"]

    resumed = tmp_path / "resumed"  # the dp=2 checkpoint, continued by one process
    assert main([*args, "--output", str(resumed), "--resume", os.path.join(out, "checkpoint-2")]) == 0
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in again if r["kind"] == "train"], [r["loss"] for r in split[2:]],
                               rtol=1e-5)
    capsys.readouterr()


_COLLECTIVE_SAVE = """import os, sys
import torch.distributed as dist
from optkit_cli.train import _collective_atomic_path
dist.init_process_group("gloo")
rank, root = dist.get_rank(), sys.argv[1]
log = open(os.path.join(sys.argv[2], f"rank-{rank}.txt"), "w")  # one file per rank: a shared stdout interleaves
for case in ("ok", "fails", "rename"):
    try:
        with _collective_atomic_path(os.path.join(root, case)) as target:
            os.makedirs(target, exist_ok=True)
            open(os.path.join(target, f"part-{rank}"), "w").write(case)
            if case == "fails" and rank == 1:
                raise OSError("disk full on rank 1")
            if case == "rename" and rank == 0:  # a rename that fails after every rank wrote its part
                os.replace = lambda a, b: (_ for _ in ()).throw(OSError("rename refused"))
        print(f"rank {rank} {case}: saved", file=log)
    except (OSError, RuntimeError) as err:
        print(f"rank {rank} {case}: {err}", file=log)
log.close()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_save_all_ranks_write_is_renamed_into_place_only_when_every_rank_succeeded(tmp_path):
    """`optkit train` under torchrun: every rank writes its part into rank 0's temporary sibling, renamed
    into place when all succeeded; when one rank fails, or rank 0's rename does, nothing is put in place, the
    temporary folder is gone, and every rank raises (none is left waiting in a later collective)."""
    script = tmp_path / "save.py"
    script.write_text(_COLLECTIVE_SAVE)
    root = tmp_path / "out"
    root.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(root), str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = sorted(line for rank in (0, 1) for line in (tmp_path / f"rank-{rank}.txt").read_text().splitlines())
    assert lines == ["rank 0 fails: " + str(root / "fails") + ": not saved, another rank failed while saving",
                     "rank 0 ok: saved", "rank 0 rename: rename refused", "rank 1 fails: disk full on rank 1",
                     "rank 1 ok: saved", "rank 1 rename: rename refused"], lines
    assert os.listdir(root) == ["ok"] and sorted(os.listdir(root / "ok")) == ["part-0", "part-1"]


# ------------------------------------------------------------------------------ device_map (one process)
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-map")
    out = {}
    for name in ("pre_ln", "untied_head"):
        config = VARIANTS[name]
        out[name] = root / name
        spec_io.save_safetensors_dir(out[name], random_weights(config, "causal_lm", 0),
                                     config.to_saved_dict("OPTForCausalLM", "float32"))
    return out


@pytest.mark.parametrize("name", ["pre_ln", "untied_head"])
def test_device_map_with_disk_offload_gives_the_same_logits(checkpoints, name, tmp_path):
    pytest.importorskip("accelerate")
    from opt_torch import OPTForCausalLM

    config = VARIANTS[name]
    one = OPTForCausalLM.from_pretrained(checkpoints[name])
    ids, mask = (torch.as_tensor(a, dtype=torch.long) for a in random_batch(config, 3, 7, 1, (0, 2, 4)))
    with torch.no_grad():
        want = one(ids, attention_mask=mask).logits
    total = _total_bytes(config)
    maps = {"auto": ("auto", {"cpu": total * 3 // 4}),  # too little for all: the layers go to disk
            "dict": ({"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "disk",
                      "model.decoder.layers.0": "cpu", "model.decoder.layers.1": "disk",
                      "model.decoder.final_layer_norm": "disk", "lm_head": "cpu"}, None)}
    for kind, (device_map, max_memory) in maps.items():
        folder = tmp_path / f"offload-{kind}"
        model = OPTForCausalLM.from_pretrained(checkpoints[name], device_map=device_map, max_memory=max_memory,
                                               offload_folder=folder)
        placed = set(model.hf_device_map.values())
        assert placed == {"cpu", "disk"}, model.hf_device_map
        assert any(f.endswith(".dat") for f in os.listdir(folder)) and model.device == torch.device("cpu")
        with torch.no_grad():
            got = model(ids, attention_mask=mask).logits
        assert float((got - want).abs().max()) < 1e-5, kind
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4),
                           one.generate(ids, attention_mask=mask, max_new_tokens=4))
        model.save_pretrained(tmp_path / f"saved-{kind}")  # offloaded weights read back: the whole folder
        again = OPTForCausalLM.from_pretrained(tmp_path / f"saved-{kind}").state_dict()
        assert all(torch.equal(again[k], v) for k, v in one.state_dict().items())


def test_device_map_refusals(checkpoints, tmp_path):
    pytest.importorskip("accelerate")
    from opt_torch import OPTForCausalLM

    with pytest.raises(ValueError, match="offload_folder"):
        OPTForCausalLM.from_pretrained(checkpoints["pre_ln"], device_map={"": "disk"})
    with pytest.raises(ValueError, match="not both"):
        OPTForCausalLM.from_pretrained(checkpoints["pre_ln"], device_map="auto", device_mesh=object())
    with pytest.raises(ValueError, match="tied"):
        OPTForCausalLM.from_pretrained(checkpoints["pre_ln"], offload_folder=tmp_path,
                                       device_map={"model": "cpu", "lm_head": "disk"})
    dispatched = OPTForCausalLM.from_pretrained(checkpoints["pre_ln"], device_map="auto")
    with pytest.raises(ValueError, match="resize_token_embeddings on a model split over processes or devices"):
        dispatched.resize_token_embeddings(200)
    with pytest.raises(ValueError, match="add_adapter on a model split .*merge it"):
        dispatched.add_adapter(pytest.importorskip("peft").LoraConfig(r=2))


# ------------------------------------------------------------------ DCP checkpoints from someone else
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_reader_runs_no_code_and_reads_only_its_folder(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from opt_spec.errors import CheckpointError
    from opt_torch.distributed import dcp_load, dcp_reader

    good = tmp_path / "good"
    dcp.save({"w": torch.arange(6.0), "lr": 0.5, "betas": (0.9, 0.99)}, checkpoint_id=good, no_dist=True)
    target = {"w": torch.zeros(6), "lr": 0.0, "betas": (0.0, 0.0)}
    dcp_load(target, good, single_process=True)
    assert torch.equal(target["w"], torch.arange(6.0)) and target["lr"] == 0.5 and target["betas"] == (0.9, 0.99)

    evil_value = tmp_path / "evil-value"  # a non-tensor value that would run code when unpickled
    dcp.save({"w": torch.arange(6.0), "lr": _RunsCode()}, checkpoint_id=evil_value, no_dist=True)
    with pytest.raises(CheckpointError, match="lr is not plain data"):
        dcp_load({"w": torch.zeros(6), "lr": 0.0}, evil_value, single_process=True)

    metadata = pickle.loads((good / ".metadata").read_bytes())
    escape = tmp_path / "escape"
    escape.mkdir()
    (escape / "__0_0.distcp").write_bytes((good / "__0_0.distcp").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "../good/__0_0.distcp"
    (escape / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="plain relative path inside the checkpoint folder"):
        dcp_reader(escape)[0].read_metadata()

    (escape / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match="refers to posix.system: not part of a DCP"):
        dcp_reader(escape)[0].read_metadata()
