"""opt_tf.fast_paths on and off: TensorFlow generate's speed with each fast path forced on, then off.

The same random 125m-shaped float32 checkpoint and prompt as bench/bench_generate.py, two models loaded
from it, one traced with the fast path on and one with it off (the choice is read when generate's loop is
traced), timed round after round in turn so that the shared machine's drift affects both alike.

    python bench/bench_tf_fast_paths.py [--preset 125m] [--repeats 3] [--batches 1,8]

Prints tokens/s (new tokens x batch / seconds, best of --repeats after a warm-up run) and on/off.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_generate import NEW, PROMPT, interleaved, make_checkpoint, make_prompts  # noqa: E402
from opt_spec import OPTConfig  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    from opt_tf import TFOPTForCausalLM, fast_paths

    config = OPTConfig.from_preset(args.preset).replace(dropout=0.0)
    batches = [int(b) for b in args.batches.split(",")]
    ids = make_prompts(config, max(batches), np.int32)
    eos = config.vocab_size - 1  # a token the random model effectively never picks: every run decodes NEW
    fns = {}
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(config, path)
        for on in (True, False):
            model = TFOPTForCausalLM.from_pretrained(path)
            fast_paths.BIAS_AS_SUBTRACTION = on
            for b in batches:
                fn = (lambda m, b: lambda: m.generate(ids[:b], max_new_tokens=NEW, eos_token_id=eos).numpy())(model, b)
                fn()  # traced and compiled now, with this setting
                fns[(on, b)] = fn
        fast_paths.BIAS_AS_SUBTRACTION = None
        best = interleaved(fns, args.repeats)
    print(f"# {args.preset} float32, prompt {PROMPT}, {NEW} new tokens; bias added as a subtraction (on) or not")
    print(f"{'batch':>5} {'on tok/s':>9} {'off tok/s':>10} {'on/off':>7}")
    for b in batches:
        on, off = NEW * b / best[(True, b)], NEW * b / best[(False, b)]
        print(f"{b:5d} {on:9.1f} {off:10.1f} {on / off:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
