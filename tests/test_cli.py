"""The `optkit` command line: end to end on tiny checkpoints (subprocess), error paths and the pieces
(in-process: they fail before any framework is imported)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from opt_spec import OPTConfig
from opt_spec.io import SafetensorsFile, save_safetensors_dir
from opt_spec.testing import random_weights
from opt_spec.data import DataError
from opt_spec.errors import CheckpointError
from opt_spec.weights import WeightMismatchError
from optkit_cli import checkpoints, parity, runners
from optkit_cli.common import CLIError
from optkit_cli.main import main
from optkit_cli.sampling import generate_loop, next_token_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def optkit(*args, cache, timeout=240):
    """Runs `python -m optkit_cli.main ARGS` with its own cache folder; returns the CompletedProcess."""
    env = dict(os.environ, OPTKIT_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    return subprocess.run([sys.executable, "-m", "optkit_cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    """A tiny causal LM (random weights) whose folder also holds a BPE tokenizer trained here."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("tiny-with-tokenizer")
    tok = Tokenizer(models.BPE())  # GPT-2's byte-level BPE, as OPT uses, with OPT's special ids 0..3
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Hello, my name is Ada.", "The quick brown fox jumps over the lazy dog."] * 4, trainer)
    tok.model.save(str(path))  # vocab.json + merges.txt
    config = OPTConfig(vocab_size=336, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                       max_position_embeddings=48)
    save_safetensors_dir(path, random_weights(config, seed=3), config.to_dict())
    return path


# ------------------------------------------------------------------------------ end to end (subprocess)
@pytest.mark.slow  # imports all three frameworks in a fresh process: ~20 s on 2 cores
def test_parity_on_tiny_preset_builds_cache_and_compares_backends(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    res = optkit("parity", "--preset", "tiny", "--json", "-q", cache=cache)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    by_name = {b["backend"]: b for b in report["backends"]}
    assert list(by_name) == ["torch", "tf", "flax"]
    assert by_name["torch"]["status"] == "ok" and by_name["torch"]["load_s"] > 0
    for b in by_name.values():  # a backend that cannot run says why; none crashes the command
        assert b["status"] in ("ok", "skipped"), b
        if b["status"] == "skipped":
            assert b["reason"]
    ran = [n for n, b in by_name.items() if b["status"] == "ok"]
    assert len(report["pairs"]) == len(ran) * (len(ran) - 1) // 2
    for pair in report["pairs"]:  # tiny float32 models agree far inside the tolerance
        assert pair["max_abs_diff"] < 1e-4 and pair["greedy_agree"] == pair["tokens"] == 40, pair
    assert report["passed"] and report["tolerance"] == parity.DEFAULT_TOLERANCE["float32"]
    assert report["random_weights"] == {"preset": "tiny", "seed": 0}
    assert report["batch"]["shape"] == [3, 16]

    folder = cache / "random-tiny-seed0"
    weights = SafetensorsFile(folder / "model.safetensors")
    assert len(weights) == 36 and sorted(os.listdir(cache)) == ["random-tiny-seed0"]  # no temp leftovers
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns

    # Second run (in-process, torch only): the cache is reused; the table names the backend and the verdict.
    monkeypatch.setenv("OPTKIT_CACHE", str(cache))
    code, out, err = run_main(capsys, "parity", "--preset", "tiny", "--backends", "torch")
    assert code == 0, err
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp
    assert "writing a random" not in err
    assert "torch    ok" in out and "PASS" in out and "RANDOM weights" in out


def test_generate_with_tokenizer_matches_greedy_decoding(model_with_tokenizer, cache, capsys):
    torch = pytest.importorskip("torch")
    from opt_spec.tokenizer import OPTTokenizer
    from opt_torch import OPTForCausalLM

    prompts = ["Hello, my name is", "The quick brown fox"]
    code, out, err = run_main(capsys, "generate", "--model", str(model_with_tokenizer), "--max-new-tokens", "6",
                              *prompts)
    assert code == 0, err
    assert "RANDOM" not in err

    # The same continuation computed here: greedy argmax, stopping at eos, decoded without specials.
    tok = OPTTokenizer.from_pretrained(model_with_tokenizer)
    model = OPTForCausalLM.from_pretrained(model_with_tokenizer)
    expected = []
    for prompt in prompts:
        ids = tok.encode(prompt)
        new = []
        with torch.no_grad():
            for _ in range(6):
                logits = model(torch.tensor([ids + new])).logits[0, -1]
                new.append(int(logits.argmax()))
                if new[-1] == 2:
                    break
        expected.append(tok.decode(new))
    lines = out.splitlines()
    assert lines[0] == f"==> prompt 0: {prompts[0]} <==" and lines[2] == f"==> prompt 1: {prompts[1]} <=="
    assert [lines[1], lines[3]] == expected

    # One prompt streams its text as it is produced: the same continuation.
    code, out, err = run_main(capsys, "generate", "--model", str(model_with_tokenizer), "--max-new-tokens", "6",
                              prompts[0])
    assert code == 0 and out == expected[0] + "\n", err
    # optkit's fallback loop (used where a backend has no generate yet) decodes the same tokens.
    code, out, err = run_main(capsys, "generate", "--model", str(model_with_tokenizer), "--max-new-tokens", "6",
                              "--fallback-loop", *prompts)
    assert code == 0 and out.splitlines()[1::2] == expected, err


def test_generate_on_random_preset_says_so(tmp_path):
    res = optkit("generate", "--preset", "tiny", "--max-new-tokens", "4", "2 10 11 12", "2 40", "-q",
                 "--do-sample", "--top-k", "5", "--top-p", "0.9", "--temperature", "0.7", "--seed", "1",
                 cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert "weights are RANDOM" in res.stderr and "token ids" in res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("==> prompt 0") and lines[2].startswith("==> prompt 1")
    for line in (lines[1], lines[3]):
        ids = [int(x) for x in line.split()]
        assert 1 <= len(ids) <= 4 and all(0 <= t < 100 for t in ids)


def test_parity_reads_a_pytorch_bin_folder_directly(capsys, cache, tmp_path):
    from opt_torch import OPTForCausalLM

    src = tmp_path / "bin-model"
    model = OPTForCausalLM.from_pretrained(checkpoints.random_checkpoint("tiny", 0, checkpoints.Console(True)).path)
    model.save_pretrained(src, safe_serialization=False)
    assert sorted(os.listdir(src)) == ["config.json", "generation_config.json", "pytorch_model.bin"]
    code, out, err = run_main(capsys, "parity", "--model", str(src), "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == str(src) and report["loaded_from"] == str(src)
    assert not os.path.exists(cache / "converted")


def test_parity_converts_a_tf_h5_folder_once(capsys, cache, tmp_path):
    pytest.importorskip("conversion.api")
    from conversion.api import convert

    src = tmp_path / "h5-model"
    convert(checkpoints.random_checkpoint("tiny", 0, checkpoints.Console(True)).path, src, to="hf-tf", progress=False)
    assert "tf_model.h5" in os.listdir(src)
    code, out, err = run_main(capsys, "parity", "--model", str(src), "--backends", "torch", "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == str(src) and report["loaded_from"].startswith(str(cache / "converted"))
    assert sorted(os.listdir(report["loaded_from"])) == ["config.json", "model.safetensors"]
    stamp = os.stat(os.path.join(report["loaded_from"], "model.safetensors")).st_mtime_ns
    code, out, err = run_main(capsys, "parity", "--model", str(src), "--backends", "torch", "--json")
    assert code == 0 and "converting" not in err  # reused
    assert os.stat(os.path.join(report["loaded_from"], "model.safetensors")).st_mtime_ns == stamp


# ---------------------------------------------------------------------------- error paths (in-process)
def run_main(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_model_dir(capsys, cache, tmp_path):
    code, _, err = run_main(capsys, "parity", "--model", str(tmp_path / "nope"))
    assert code == 2 and "no such directory" in err
    code, _, err = run_main(capsys, "generate", "--model", str(tmp_path / "nope"), "2 3")
    assert code == 2 and "no such directory" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.txt").write_text("")
    code, _, err = run_main(capsys, "parity", "--model", str(tmp_path / "empty"))
    assert code == 2 and "no config.json" in err and "weights.txt" in err
    code, _, err = run_main(capsys, "parity", "--model", str(tmp_path / "empty"), "--preset", "tiny")
    assert code == 2 and "only one of them" in err


def test_bad_backend_and_preset_names(capsys, cache):
    code, _, err = run_main(capsys, "generate", "--backend", "mxnet", "--preset", "tiny", "2 3")
    assert code == 2 and "mxnet" in err and "torch, tf or flax" in err
    code, _, err = run_main(capsys, "parity", "--backends", "torch,caffe", "--preset", "tiny")
    assert code == 2 and "caffe" in err
    code, _, err = run_main(capsys, "parity", "--preset", "1b")
    assert code == 2 and "unknown preset '1b'" in err and "125m" in err
    assert not cache.exists() or not os.listdir(cache)  # nothing written for a bad command


def test_prompt_too_long(capsys, cache):
    too_long = " ".join(["5"] * 65)  # the tiny preset has 64 positions
    code, _, err = run_main(capsys, "generate", "--preset", "tiny", "-q", too_long)
    assert code == 2 and "65 tokens long" in err and "max_position_embeddings" in err
    code, _, err = run_main(capsys, "generate", "--preset", "tiny", "-q", "--max-new-tokens", "10",
                            " ".join(["5"] * 60))
    assert code == 2 and "--max-new-tokens 4 or less" in err
    code, _, err = run_main(capsys, "parity", "--preset", "tiny", "-q", "--length", "65")
    assert code == 2 and "max_position_embeddings" in err


def test_bad_prompts_and_options(capsys, cache):
    code, _, err = run_main(capsys, "generate", "--preset", "tiny", "-q", "Hello there")
    assert code == 2 and "--tokenizer DIR" in err
    code, _, err = run_main(capsys, "generate", "--preset", "tiny", "-q", "2 100")
    assert code == 2 and "token id 100 is outside the vocabulary [0, 100)" in err
    code, _, err = run_main(capsys, "generate", "--preset", "tiny", "-q", "--top-p", "0", "2 3")
    assert code == 2 and "--top-p" in err
    with pytest.raises(SystemExit) as exc:  # argparse's own usage errors exit 2 too
        main(["generate", "--max-new-tokens", "many", "2"])
    assert exc.value.code == 2
    for argv in (["generate", "--seed", "-1", "2"], ["parity", "--weights-seed", "4294967296"],
                 ["train", "--seed", "1.5"]):  # opt_spec.inputs' seed rule, as a usage error
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "a seed is an int in [0, 2**32)" in capsys.readouterr().err


def test_missing_framework_names_the_extra(capsys, cache, monkeypatch):
    monkeypatch.setattr(runners, "is_available", lambda name: False)
    with pytest.raises(runners.BackendUnavailableError, match=r"pip install 'optkit\[flax\]'"):
        runners.import_backend("flax")
    code, _, err = run_main(capsys, "generate", "--preset", "tiny", "-q", "--backend", "tf", "2 3")
    assert code == 2 and "pip install 'optkit[tf]'" in err and "Traceback" not in err
    code, _, err = run_main(capsys, "parity", "--preset", "tiny", "-q")
    assert code == 2 and "no backend ran" in err and "optkit[torch]" in err


# ------------------------------------------------------------------------------------- exit statuses
def _raising(err):
    def handler(args, console):
        raise err
    return handler


@pytest.mark.parametrize("err,code", [
    (CheckpointError("model.safetensors: header too long"), 1),  # refused input
    (WeightMismatchError(["lm_head.weight"], [], []), 1),
    (DataError("train.jsonl", 3, "missing field 'text'"), 1),
    (PermissionError(13, "Permission denied", "out/x"), 1),
    (CLIError("--steps must be at least 1"), 2),                   # usage
    (FileNotFoundError("data.jsonl: no such file"), 2),
])
def test_known_errors_are_one_line_with_their_status(capsys, monkeypatch, err, code):
    monkeypatch.setattr(parity, "run", _raising(err))
    got, _, stderr = run_main(capsys, "parity")
    assert got == code and stderr == f"optkit parity: error: {err}\n"


@pytest.mark.parametrize("err", [ValueError("bad shape (3,)\nsecond line"), KeyError("decoder"),
                                 TypeError("unsupported operand"), ZeroDivisionError("division by zero")])
def test_a_bug_is_an_internal_error_not_a_usage_error(capsys, monkeypatch, err):
    """A plain ValueError (or any exception no reader or argument check raises) is optkit's bug: exit 1, one
    line naming its type and how to see the traceback."""
    monkeypatch.setattr(parity, "run", _raising(err))
    code, _, stderr = run_main(capsys, "parity")
    first = str(err).splitlines()[0] if str(err) else ""
    assert code == 1
    assert stderr == (f"optkit parity: internal error: {type(err).__name__}: {first} "
                      "(run with --debug for the traceback)\n")


def test_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setattr(parity, "run", _raising(ValueError("a bug")))
    for argv in (["--debug", "parity"], ["parity", "--debug"]):
        with pytest.raises(ValueError, match="a bug"):  # re-raised: Python prints the traceback
            main(argv)
    monkeypatch.setenv("OPTKIT_DEBUG", "1")
    with pytest.raises(ValueError, match="a bug"):
        main(["parity"])
    monkeypatch.setattr(parity, "run", _raising(CLIError("a usage error")))
    assert run_main(capsys, "--debug", "parity")[0] == 2  # known errors stay one line under --debug too


def test_internal_error_in_a_process(tmp_path):
    """End to end in a fresh process: a bug is not dressed as a usage error; --debug prints the traceback."""
    script = ("import sys; from optkit_cli import main, parity\n"
              "def boom(args, console): raise RuntimeError('unexpected state')\n"
              "parity.run = boom\n"
              "sys.exit(main.main(sys.argv[1:]))\n")
    env = dict(os.environ, OPTKIT_CACHE=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", script, "parity"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 1
    assert res.stderr == ("optkit parity: internal error: RuntimeError: unexpected state (run with --debug for the "
                          "traceback)\n")
    res = subprocess.run([sys.executable, "-c", script, "--debug", "parity"], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr and "unexpected state" in res.stderr


def test_random_checkpoint_is_atomic_and_deterministic(cache, monkeypatch):
    import opt_spec.testing

    calls = []

    def failing(spec, config, seed=0, dtype=np.float32):
        calls.append(spec.name)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C half-way
        return opt_spec.testing.random_weight(spec, config, seed, dtype)

    monkeypatch.setattr(checkpoints, "random_weight", failing)
    console = checkpoints.Console(quiet=True)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.random_checkpoint("tiny", 7, console)
    assert os.listdir(cache) == []  # nothing half-written left behind
    monkeypatch.undo()
    monkeypatch.setenv("OPTKIT_CACHE", str(cache))
    src = checkpoints.random_checkpoint("tiny", 7, console)
    assert src.random == {"preset": "tiny", "seed": 7} and src.config.num_hidden_layers == 2
    weights = SafetensorsFile(os.path.join(src.path, "model.safetensors"))
    expected = random_weights(OPTConfig.from_preset("tiny"), seed=7)
    assert sorted(weights) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array)
    # A folder whose weights do not match the table is rebuilt, not trusted.
    os.remove(os.path.join(src.path, "model.safetensors"))
    checkpoints.random_checkpoint("tiny", 7, console)
    assert len(SafetensorsFile(os.path.join(src.path, "model.safetensors"))) == len(expected)


def test_quiet_silences_progress(capsys, cache):
    console = checkpoints.Console(quiet=False)
    checkpoints.random_checkpoint("pre_ln", 0, console)
    assert "writing a random pre_ln checkpoint" in capsys.readouterr().err
    checkpoints.random_checkpoint("pre_ln", 1, checkpoints.Console(quiet=True))
    assert capsys.readouterr().err == ""


def test_convert_and_bench_commands(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:  # wired to conversion.cli's own options
        main(["convert", "--help"])
    assert exc.value.code == 0 and "usage: optkit convert" in capsys.readouterr().out
    code, _, err = run_main(capsys, "bench", "--dir", str(tmp_path))
    assert code == 2 and "no benchmarks to run" in err
    (tmp_path / "hello.py").write_text("print('bench says hi')\n")
    (tmp_path / "broken.py").write_text("raise SystemExit(3)\n")
    code, out, _ = run_main(capsys, "bench", "--dir", str(tmp_path), "--list")
    assert code == 0 and out.split() == ["broken", "hello"]
    res = subprocess.run([sys.executable, "-m", "optkit_cli.main", "bench", "--dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1 and "bench says hi" in res.stdout and "broken (exit 3)" in res.stderr


# ------------------------------------------------------------------------------------ parity verdicts
def test_parity_exit_status_follows_tolerance(capsys, cache, monkeypatch):
    """Two fake backends whose logits differ by 5e-4 at one real position (and by 5 at a pad)."""
    base = np.random.default_rng(0).standard_normal((3, 16, 100)).astype(np.float32)

    def fake_run_backend(name, path, dtype, ids, mask):
        logits = base.copy()
        if name == "flax":
            logits[0, 3, 7] += 5e-4
            logits[1, 0, :] += 5.0  # row 1 starts with 3 pads: ignored
        return {"backend": name, "status": "ok", "import_s": 0.1, "load_s": 0.2, "first_forward_s": 0.3,
                "forward_s": 0.1}, logits

    monkeypatch.setattr(parity, "run_backend", fake_run_backend)
    code, out, _ = run_main(capsys, "parity", "--preset", "tiny", "-q", "--backends", "torch,flax", "--json")
    report = json.loads(out)
    assert code == 0 and report["passed"]
    (pair,) = report["pairs"]
    assert pair["max_abs_diff"] == pytest.approx(5e-4, rel=1e-3) and pair["greedy_agree"] == 40
    code, out, _ = run_main(capsys, "parity", "--preset", "tiny", "-q", "--backends", "torch,flax",
                            "--tolerance", "1e-4")
    assert code == 1 and "FAIL: torch vs flax beyond 0.0001" in out and "NO" in out

    def skip_tf(name, path, dtype, ids, mask):
        if name == "tf":
            return {"backend": "tf", "status": "skipped", "reason": "x", "install": "y"}, None
        return fake_run_backend(name, path, dtype, ids, mask)

    monkeypatch.setattr(parity, "run_backend", skip_tf)
    assert run_main(capsys, "parity", "--preset", "tiny", "-q", "--backends", "torch,tf")[0] == 0
    assert run_main(capsys, "parity", "--preset", "tiny", "-q", "--backends", "torch,tf", "--strict")[0] == 1


# ----------------------------------------------------------------------------------- fallback decoding
def _fake_forward(V=11):
    """Logits that favour token (last token + 1) % V, with a distinct second choice."""
    def forward(ids, mask):
        B, T = ids.shape
        logits = np.zeros((B, T, V), np.float32)
        for b in range(B):
            for t in range(T):
                logits[b, t, (ids[b, t] + 1) % V] = 3.0
                logits[b, t, (ids[b, t] + 2) % V] = 2.0
        return logits
    return forward


def test_fallback_loop_greedy_eos_and_sampling():
    ids = np.array([[1, 1, 4], [5, 6, 7]])
    mask = np.array([[0, 0, 1], [1, 1, 1]])
    out = generate_loop(_fake_forward(), ids, mask, max_new_tokens=4, eos_token_id=9, pad_token_id=1)
    assert out[:, 3:].tolist() == [[5, 6, 7, 8], [8, 9, 1, 1]]  # row 1 stops at eos 9, then pads
    out = generate_loop(_fake_forward(), ids, mask, max_new_tokens=4, min_new_tokens=2, eos_token_id=9,
                        pad_token_id=1)
    assert out[1, 3:].tolist() == [8, 10, 0, 1]  # eos barred at step 1: the second choice, then on
    a = generate_loop(_fake_forward(), ids, mask, max_new_tokens=6, do_sample=True, seed=3, eos_token_id=None)
    b = generate_loop(_fake_forward(), ids, mask, max_new_tokens=6, do_sample=True, seed=3, eos_token_id=None)
    np.testing.assert_array_equal(a, b)
    k1 = generate_loop(_fake_forward(), ids, mask, max_new_tokens=4, do_sample=True, top_k=1, seed=0)
    np.testing.assert_array_equal(k1[:, 3:], [[5, 6, 7, 8], [8, 9, 10, 0]])


def test_next_token_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = np.ones((1, 1), bool)
    kept = lambda s: np.isfinite(s[0]).nonzero()[0].tolist()  # noqa: E731
    opts = dict(temperature=1.0, top_k=0, repetition_penalty=1.0)
    assert kept(next_token_scores(logits, np.zeros((1, 1), int), seen, top_p=0.5, **opts)) == [0]
    assert kept(next_token_scores(logits, np.zeros((1, 1), int), seen, top_p=0.7, **opts)) == [0, 1]
    assert kept(next_token_scores(logits, np.zeros((1, 1), int), seen, top_p=0.9, **opts)) == [0, 1, 2]
    opts = dict(temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    assert kept(next_token_scores(logits, np.zeros((1, 1), int), seen, top_k=2, **opts)) == [0, 1]
    pen = next_token_scores(np.array([[2.0, -2.0, 1.0]]), np.array([[0, 1]]), np.ones((1, 2), bool),
                            temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=2.0)
    assert pen.tolist() == [[1.0, -4.0, 1.0]]


def test_generate_asks_for_each_step_only_when_watched(model_with_tokenizer, cache, capsys, monkeypatch):
    """A per-step callback sends TF and Flax down their slower host loop, so a batch whose progress nobody sees
    (stderr not a terminal) runs without one; a streamed single prompt still gets one."""
    from optkit_cli import generate as cli_generate

    seen = []
    real = cli_generate.load_runner

    def recording(*args, **kwargs):
        runner, info = real(*args, **kwargs)
        inner = runner.generate

        def generate(*a, streamer=None, **kw):
            seen.append(streamer is not None)
            return inner(*a, streamer=streamer, **kw)

        runner.generate = generate
        return runner, info

    monkeypatch.setattr(cli_generate, "load_runner", recording)
    for prompts in (["Hello, my name is", "The quick brown fox"], ["Hello, my name is"]):
        code, out, err = run_main(capsys, "generate", "--model", str(model_with_tokenizer), "--max-new-tokens", "3",
                                  *prompts)
        assert code == 0, err
    assert seen == [False, True]


def test_generate_sampling_filters_and_a_files_output_record(model_with_tokenizer, tmp_path, cache, capsys):
    """--min-p / --typical-p reach the backend's generate (the model's own call with them gives the printed
    tokens, and they change them); the fallback loop refuses them by name; a generation_config.json asking
    for generate's output record (return_dict_in_generate) still prints the ids."""
    import shutil

    torch = pytest.importorskip("torch")
    from opt_spec.tokenizer import left_pad
    from opt_torch import OPTForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(model_with_tokenizer, folder)
    (folder / "generation_config.json").write_text(json.dumps({"return_dict_in_generate": True,
                                                                "output_scores": True}))
    prompts = ["2 10 11", "2 40"]
    common = ["generate", "--model", str(folder), "--ids", "-q", "--max-new-tokens", "5", "--do-sample", "--seed", "1"]
    code, out, err = run_main(capsys, *common, "--min-p", "0.2", "--typical-p", "0.8", *prompts)
    assert code == 0, err
    printed = out.splitlines()[1::2]

    model = OPTForCausalLM.from_pretrained(folder)
    batch = left_pad([[int(t) for t in p.split()] for p in prompts], 1)
    with torch.no_grad():
        record = model.generate(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]),
                                max_new_tokens=5, do_sample=True, seed=1, top_k=0, min_p=0.2, typical_p=0.8)
    new = record.sequences[:, batch["input_ids"].shape[1]:].tolist()  # the file's setting: a record
    want = [" ".join(str(t) for t in (row[:row.index(2) + 1] if 2 in row else row)) for row in new]  # up to EOS
    assert printed == want

    code, out, err = run_main(capsys, *common, *prompts)
    assert code == 0 and out.splitlines()[1::2] != printed, err  # without the filters: other tokens
    code, _, err = run_main(capsys, *common, "--min-p", "0.2", "--fallback-loop", *prompts)
    assert code == 2 and "--min-p: needs the torch backend's own generate()" in err
    code, _, err = run_main(capsys, *common, "--typical-p", "0", *prompts)
    assert code == 2 and "--typical-p 0" in err
