"""Entry point: ``convert-checkpoint [verify|hf|quantize|kt|verify-kt] ...``; flag errors and bad input are one line."""
from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import ConversionError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] not in (["verify"], ["verify-kt"]):
        from .prefetch import start_from_argv

        start_from_argv(argv)  # before torch is imported: the disk reads while Python starts
    if argv[:1] == ["verify"]:
        from .verify import main as verify_main

        return verify_main(argv[1:])
    if argv[:1] == ["quantize"]:  # HF -> HF, model-free quantization
        from .quantize_cmd import not_quantized_lines, parse_quantize_options

        return run(lambda: parse_quantize_options(argv[1:]), "convert-checkpoint quantize", not_quantized_lines)
    if argv[:1] == ["kt"]:  # KTransformers CPU experts (kt-kernel's convert_cpu_weights.py flags)
        from .kt_cmd import parse_kt_options

        return run(lambda: parse_kt_options(argv[1:]), "convert-checkpoint kt")
    if argv[:1] == ["verify-kt"]:
        from .verify_kt import main as verify_kt_main

        return verify_kt_main(argv[1:])
    if argv[:1] == ["hf"]:  # HF -> HF through converters
        from .options import parse_hf_options

        return run(lambda: parse_hf_options(argv[1:]), "convert-checkpoint hf")
    from .options import parse_options

    return run(lambda: parse_options(argv), "convert-checkpoint")


def run(parse: Callable, prog: str, dry_run_lines: Callable | None = None) -> int:
    """Parse, then the run sequence of ``api.run``; errors become one line with an exit code.
    ``dry_run_lines(plan)`` adds a subcommand's own lines to ``--dry_run``'s output."""
    # Imports inside so that `--help` and flag errors stay fast.
    from . import api
    from .distributed import SINGLE, world_from

    world = SINGLE
    try:
        opts = parse()
        world = world_from(opts.world_size, opts.rank)
        outcome = api.run(opts, world=world)
        if opts.dry_run and dry_run_lines is not None:
            for line in dry_run_lines(outcome.plan):
                print(line)
    except ConversionError as e:
        print(f"{prog}{_who(world)}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, permissions ... while writing: the files in flight were removed
        print(f"{prog}{_who(world)}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _who(world) -> str:
    return f" [rank {world.rank}/{world.size}]" if world.size > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
