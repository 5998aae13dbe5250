"""Corpus loading speed and memory: `opt_spec.data.load_text` against the old whole-file approach.

The inputs are made here, seeded and offline, in a temporary directory that is deleted afterwards: a
synthetic corpus of --mb megabytes (10^6 bytes; Zipf-drawn words of a random lexicon, a few with
non-ASCII letters, lines of ~12 words, paragraphs of 20-200 words separated by blank lines, so that
documents="file", "line" and "paragraph" cut it differently) and a byte-level BPE tokenizer (GPT-2's
ByteLevel pre-tokenizer without prefix space, OPT's special tokens <s> <pad> </s> <unk> as ids 0..3,
--vocab ids) trained with the `tokenizers` library on the corpus's first megabytes and saved as
tokenizer.json, read back with OPTTokenizer.from_pretrained.

For each documents mode two child processes load the corpus into seq_len blocks:
- baseline: what opt_spec.data did before (commit 52e4498): the whole file read into one string, split
  into documents (by their definition, opt_spec.data.documents_of), each document encoded whole into one
  Python list of ints, then cut into lists of seq_len ids (baseline_load below);
- optkit: opt_spec.data.load_text(path, tokenizer, seq_len, documents=mode), without a cache_dir (no token
  cache: every run encodes the corpus).
Each child reports seconds (the load only: imports and the tokenizer's loading are left out), its
resident memory after imports and the tokenizer (base), its peak (VmHWM, taken before the checksum is
computed), the number of blocks and tokens, and sha256 of the ids as one int64 array (the blocks one
after the other), so the table shows that both give the same ids. The parent reads each child's peak
from os.wait4's rusage too, as a cross-check.

The baseline needs ~150x the corpus size in memory for documents="file" (one encoding of the whole
text, with its offsets and Python ints). It is skipped, with the reason printed, when its estimate
(ESTIMATE x corpus size) exceeds the memory available (/proc/meminfo); every child also runs under an
address-space limit (RLIMIT_AS, default: the memory available at the start less 2 GiB, --limit-gb),
so one that would not fit reports "out of memory" instead of taking the machine down.

    python bench/bench_data.py [--mb 100] [--documents file,line,paragraph] [--seq-len 1024]
                               [--vocab 8000] [--seed 0] [--limit-gb GB] [--dir /tmp] [--json PATH]

Prints, per mode: baseline seconds and peak MB, optkit seconds and peak MB, the speed-up (baseline s /
optkit s), the memory ratio (baseline peak / optkit peak), optkit's MB/s and tokens/s, and whether the
ids are equal. --json PATH writes the records. The corpus was just written, so it is read from the OS
page cache (a cold disk is slower). The tokenizer encodes on all cores: the speed-up depends on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("file", "line", "paragraph")
ESTIMATE = {"file": 160, "line": 40, "paragraph": 40}  # baseline peak RSS / corpus bytes, with margin
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]             # OPT's, ids 0..3
CHUNK_WORDS = 200_000                                    # the corpus is made and written this many words at a time


# ------------------------------------------------------------------------------------------ inputs
def make_corpus(path: str, megabytes: float, seed: int) -> int:
    """Writes the synthetic corpus (see the module docstring); returns its size in bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    rare = list("éèüößñçøåłżčš") + ["中", "文", "日", "本", "🙂"]
    lexicon = []
    for _ in range(20_000):
        word = "".join(rng.choice(letters, size=int(rng.integers(1, 11))))
        if rng.random() < 0.02:  # a multi-byte character somewhere in the word
            at = int(rng.integers(0, len(word) + 1))
            word = word[:at] + rare[int(rng.integers(len(rare)))] + word[at:]
        if rng.random() < 0.05:
            word = word.capitalize()
        lexicon.append(word)
    # Every (word, punctuation, separator) as one string: a chunk is then one join over indices.
    suffixes, separators = ("", ",", "."), (" ", "\n", "\n\n")
    pieces = [w + s + sep for w in lexicon for s in suffixes for sep in separators]
    zipf = 1.0 / (np.arange(len(lexicon)) + 2.7)
    zipf /= zipf.sum()
    written, words_written, per_word = 0, 0, 7.0  # bytes a word, from what is written: the last chunk fits
    with open(path, "w", encoding="utf-8", newline="") as f:
        while written < megabytes * 1e6:
            want = min(CHUNK_WORDS, int((megabytes * 1e6 - written) / per_word) + 1)
            lengths = rng.integers(20, 201, size=want // 20 + 1)             # paragraph lengths, in words
            lengths = lengths[:int(np.searchsorted(np.cumsum(lengths), want)) + 1]
            n = int(lengths.sum())
            words = rng.choice(len(lexicon), size=n, p=zipf)
            suffix = rng.choice(3, size=n, p=[0.9, 0.06, 0.04])
            sep = (rng.random(n) < 1 / 12).astype(np.int64)                # a line break within the paragraph
            sep[np.cumsum(lengths) - 1] = 2                                # a blank line ends each paragraph
            index = (words * 3 + suffix) * 3 + sep
            text = "".join(map(pieces.__getitem__, index.tolist()))
            f.write(text)
            written += len(text.encode("utf-8"))
            words_written += n
            per_word = written / words_written
    return os.path.getsize(path)


def make_tokenizer(directory: str, corpus: str, vocab_size: int) -> None:
    """A byte-level BPE trained on the corpus's first 4 MB, saved as tokenizer.json in directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus, encoding="utf-8") as f:
        sample = f.read(4_000_000).splitlines()
    tok.train_from_iterator(sample, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))


# ------------------------------------------------------------------------------------------ the baseline
def baseline_load(path: str, tokenizer, seq_len: int, documents: str) -> list[list[int]]:
    """The old load_text for one file: read whole, split (the definition, opt_spec.data.documents_of), encode
    each document whole, pack into lists."""
    from opt_spec.data import documents_of

    with open(path, encoding="utf-8") as f:
        docs = documents_of(f.read(), documents)  # the text itself is dropped once split, as before
    stream = [tokenizer.bos_token_id]
    for doc in docs:
        stream.extend(tokenizer.encode(doc, add_bos=False))
        stream.append(tokenizer.eos_token_id)
    return [list(stream[i:i + seq_len]) for i in range(0, len(stream), seq_len)]


# ------------------------------------------------------------------------------------------ children
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(job: dict) -> dict:
    """One load in this process (the child's side): the record the parent prints."""
    resource.setrlimit(resource.RLIMIT_AS, (job["limit"], job["limit"]))
    from opt_spec.data import load_text
    from opt_spec.tokenizer import OPTTokenizer

    tokenizer = OPTTokenizer.from_pretrained(job["tokenizer"])
    after_imports = _status("VmRSS")
    start = time.perf_counter()
    try:
        if job["kind"] == "baseline":
            blocks = baseline_load(job["corpus"], tokenizer, job["seq_len"], job["documents"])
            rows = iter(blocks)
        else:
            dataset = load_text(job["corpus"], tokenizer, job["seq_len"], documents=job["documents"])
            rows = (dataset.row(i) for i in range(len(dataset)))
            blocks = dataset.rows
    except MemoryError:
        return dict(error="out of memory (MemoryError)", rss_after_imports=after_imports)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")  # before the checksum, which is not part of loading
    digest, tokens = hashlib.sha256(), 0
    for row in rows:  # the blocks one after the other: the hash of the whole stream as one int64 array
        ids = np.asarray(row, dtype=np.int64)
        digest.update(ids.tobytes())
        tokens += len(ids)
    return dict(seconds=seconds, rss_after_imports=after_imports, peak=peak, blocks=len(blocks), tokens=tokens,
                sha256=digest.hexdigest())


def run_child(job: dict) -> dict:
    """Runs `job` in a fresh interpreter (under job["limit"] bytes of address space); its peak also from
    wait4's rusage, which is this child's alone (getrusage(RUSAGE_CHILDREN) is the largest of all so far)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                                stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read().decode()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    lines = out.strip().splitlines()
    if code == 0 and lines:
        result = json.loads(lines[-1])
    elif code < 0 or "memory allocation" in stderr or "MemoryError" in stderr or "bad_alloc" in stderr:
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else "allocation failed"
        result = dict(error=f"out of memory ({why})")
    else:
        raise RuntimeError(f"{job['kind']} documents={job['documents']} failed (exit {code}):\n{stderr[-3000:]}")
    result["rusage_peak"] = usage.ru_maxrss * 1024  # Linux: kilobytes
    return result


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


# ------------------------------------------------------------------------------------------ main
def _side(r: dict) -> tuple[str, str]:
    """(seconds, peak MB) cells of one side, or why there are none."""
    if "skipped" in r:
        return "skipped", ""
    if "error" in r:
        return "OOM" if "out of memory" in r["error"] else "failed", ""
    return f"{r['seconds']:.1f}", f"{r['peak'] / 1e6:.0f}"


def print_row(mode: str, size: int, base: dict, ours: dict) -> None:
    ok = {side: "sha256" in r for side, r in (("baseline", base), ("optkit", ours))}
    speed = memory = rate = tps = ""
    equal = "-"
    if ok["optkit"]:
        rate, tps = f"{size / 1e6 / ours['seconds']:.1f}", f"{ours['tokens'] / ours['seconds']:,.0f}"
    if ok["baseline"] and ok["optkit"]:
        speed, memory = f"{base['seconds'] / ours['seconds']:.1f}x", f"{base['peak'] / ours['peak']:.1f}x"
        equal = "yes" if (base["sha256"], base["blocks"]) == (ours["sha256"], ours["blocks"]) else "NO"
    tokens = ours.get("tokens", base.get("tokens"))
    print(f"{mode:10} {' '.join(f'{c:>8}' for c in _side(base))}  {' '.join(f'{c:>8}' for c in _side(ours))}  "
          f"{speed:>8} {memory:>7}  {rate:>5} {tps:>10}  {equal:>5} {'-' if tokens is None else f'{tokens:,}':>12}")
    for side, r in (("baseline", base), ("optkit", ours)):
        if "error" in r:
            print(f"  ({side} documents={mode}: {r['error']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="corpus size in MB (10^6 bytes)")
    parser.add_argument("--documents", default=",".join(MODES), help="documents modes, comma separated")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000, help="the BPE vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-gb", type=float, default=None,
                        help="address-space limit of each child (default: memory available less 2 GiB)")
    parser.add_argument("--dir", default=None, help="where the temporary inputs go (default: $TMPDIR)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the records here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    modes = [m.strip() for m in args.documents.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--documents {args.documents!r}: choose from {', '.join(MODES)}")
    available = mem_available()
    limit = int(args.limit_gb * 2**30) if args.limit_gb else max(available - 2 * 2**30, 2**30)

    work = tempfile.mkdtemp(prefix="optkit-bench-data-", dir=args.dir)
    records = []
    try:
        t0 = time.perf_counter()
        corpus = os.path.join(work, "corpus.txt")
        size = make_corpus(corpus, args.mb, args.seed)
        t1 = time.perf_counter()
        make_tokenizer(os.path.join(work, "tokenizer"), corpus, args.vocab)
        print(f"corpus: {size / 1e6:.1f} MB of synthetic text (seed {args.seed}), made in {t1 - t0:.0f} s; "
              f"byte-level BPE of {args.vocab} ids trained in {time.perf_counter() - t1:.0f} s; seq_len {args.seq_len}")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min), "
              f"{available / 2**30:.1f} GiB available; each child limited to {limit / 2**30:.1f} GiB of address space")
        print(f"{'':10} {'baseline':>17}  {'optkit':>17}")
        print(f"{'documents':10} {'seconds':>8} {'peak MB':>8}  {'seconds':>8} {'peak MB':>8}  {'speed-up':>8} "
              f"{'memory':>7}  {'MB/s':>5} {'tokens/s':>10}  {'equal':>5} {'tokens':>12}")
        for mode in modes:
            job = dict(corpus=corpus, tokenizer=os.path.join(work, "tokenizer"), seq_len=args.seq_len,
                       documents=mode, limit=limit)
            need = ESTIMATE[mode] * size
            if need > min(available, limit):
                base = dict(skipped=f"needs ~{need / 1e9:.1f} GB; {available / 1e9:.1f} GB available, "
                                    f"limit {limit / 1e9:.1f} GB")
                print(f"  (baseline documents={mode} skipped: it needs ~{ESTIMATE[mode]} x {size / 1e6:.0f} MB = "
                      f"{need / 1e9:.1f} GB; {available / 1e9:.1f} GB available, limit {limit / 1e9:.1f} GB)")
            else:
                base = run_child(dict(job, kind="baseline"))
            ours = run_child(dict(job, kind="optkit"))
            records.append(dict(documents=mode, corpus_bytes=size, seq_len=args.seq_len, vocab=args.vocab,
                                seed=args.seed, baseline=base, optkit=ours))
            print_row(mode, size, base, ours)
        checks = [(r["documents"], side, r[side]) for r in records for side in ("baseline", "optkit")
                  if "peak" in r[side]]
        worst = max((abs(c["rusage_peak"] / c["peak"] - 1) for _, _, c in checks), default=0.0)
        bases = [c["rss_after_imports"] / 1e6 for _, _, c in checks]
        print(f"speed-up = baseline s / optkit s; memory = baseline peak / optkit peak; peak = the child's VmHWM "
              f"(getrusage via wait4 within {worst:.1%} of it), RSS after imports and the tokenizer "
              f"{min(bases, default=0):.0f}-{max(bases, default=0):.0f} MB; load average at the end "
              f"{os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        from opt_spec.io import atomic_write_text

        machine = dict(cores=os.cpu_count(), cpu=cpu_model(),
                       mem_available=available, child_limit=limit, python=platform.python_version())
        atomic_write_text(args.json, json.dumps(dict(machine=machine, records=records), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
