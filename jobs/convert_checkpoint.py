"""Convert a pickled checkpoint (a whole model, or a dict holding one) to safetensors.

Unpickling runs code from the file, so this needs --trust-pickle: use it only on files whose origin
you trust. The output holds tensors only and is safe to load anywhere.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.checkpoint import save_safetensors, state_dict_from_pickle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.convert_checkpoint", description=__doc__)
    p.add_argument("--trust-pickle", action="store_true", help="I trust this file's origin: unpickle it (runs its code)")
    p.add_argument("input", help="pickled checkpoint (.pt/.pth/.pth.tar)")
    p.add_argument("output", help="where to write the .safetensors file")
    args = p.parse_args(argv)
    if not args.trust_pickle:
        print("error: refusing to unpickle without --trust-pickle (unpickling runs code from the file)", file=sys.stderr)
        return 2
    state = state_dict_from_pickle(args.input)
    save_safetensors(state, args.output, {"converted_from": args.input})
    print(f"wrote {len(state)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
