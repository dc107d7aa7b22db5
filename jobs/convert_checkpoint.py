"""Convert a pickled checkpoint (a whole model, or a dict holding one) to safetensors.

Unpickling runs code from the file, so this needs --trust-pickle: use it only on files whose origin
you trust. The output holds tensors only and is safe to load anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys

from jobs._common import add_common, fail, setup_logging
from pipeline.core.errors import CheckpointError, CxrAuditError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.convert_checkpoint", description=__doc__)
    p.add_argument("--trust-pickle", action="store_true", help="I trust this file's origin: unpickle it (runs its code)")
    p.add_argument("input", help="pickled checkpoint (.pt/.pth/.pth.tar)")
    p.add_argument("output", help="where to write the .safetensors file")
    args = add_common(p).parse_args(argv)
    setup_logging(args)
    if not args.trust_pickle:
        print("error: refusing to unpickle without --trust-pickle (unpickling runs code from the file)", file=sys.stderr)
        return 2
    if "://" not in args.input and not os.path.isfile(args.input):
        return fail(CheckpointError(f"{args.input}: no such file; pass the path of the pickled checkpoint to convert"))
    from pipeline.inference.checkpoint import save_safetensors, state_dict_from_pickle  # torch: only once the flags are right

    try:
        state = state_dict_from_pickle(args.input)
    except CxrAuditError as e:
        return fail(e)
    except ModuleNotFoundError as e:  # a pickled whole model needs its class: torchxrayvision's, say
        extra = " (install the extra: pip install -e \".[torchxrayvision]\")" if e.name == "torchxrayvision" else ""
        return fail(CheckpointError(f"{args.input} pickles a model whose module {e.name!r} is not installed{extra}; "
                                    "install it and convert again"))
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises on a file that is not a checkpoint
        return fail(CheckpointError(f"{args.input} could not be read as a torch checkpoint ({type(e).__name__}: {e})"))
    save_safetensors(state, args.output, {"converted_from": args.input})
    print(f"wrote {len(state)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
