"""Entry point: parse flags, plan and validate, then execute (or print the plan)."""
from __future__ import annotations

import sys
import time

from .errors import ConversionError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        from .verify import main as verify_main

        return verify_main(argv[1:])
    if argv[:1] == ["hf"]:  # HF -> HF through converters
        from .options import parse_hf_options

        return run(lambda: parse_hf_options(argv[1:]), "convert-checkpoint hf")
    from .options import parse_options

    return run(lambda: parse_options(argv), "convert-checkpoint")


def run(parse, prog: str) -> int:
    """Parse, plan and validate, then execute (or print the plan); errors are one line."""
    # Imports inside so that `--help` and flag errors stay fast.
    from .distributed import SINGLE, join, leave, world_from
    from .execute import check_memory_budget, default_memory_budget, execute
    from .plan import build_plan, describe_plan
    from .report import fp8_summary, value_warnings

    world = SINGLE
    try:
        opts = parse()
        world = world_from(opts.world_size, opts.rank)
        start = time.perf_counter()
        plan = build_plan(opts)
        budget = opts.max_memory if opts.max_memory is not None else default_memory_budget()
        check_memory_budget(plan, budget)
        if opts.dry_run:
            print(describe_plan(plan, verbose=opts.verbose))
            if budget is not None:
                print(f"memory budget: {budget / 2**30:.2f} GiB of output files in flight "
                      f"({'--max_memory' if opts.max_memory is not None else 'half of the available memory'})")
            return 0
        if world.leader:
            print(describe_plan(plan), file=sys.stderr)
        join(world)
        try:
            results = execute(plan, opts.max_workers, opts.overwrite, opts.progress and world.leader, opts.resume,
                              budget, world, opts.strict_values)
        finally:
            leave(world)
    except ConversionError as e:
        print(f"{prog}{_who(world)}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, permissions ... while writing: the files in flight were removed
        print(f"{prog}{_who(world)}: error: {e}", file=sys.stderr)
        return 1
    if not world.leader:
        return 0
    seconds = time.perf_counter() - start
    gb = sum(r.nbytes for r in results if not r.reused) / 1e9
    for line in fp8_summary(results, limit=1000 if opts.verbose else 10) + value_warnings(results):
        print(line, file=sys.stderr)
    reused = sum(1 for r in results if r.reused)
    kept = f" ({reused} finished earlier, verified and kept)" if reused else ""
    print(f"done: {len(results)} files{kept}, {gb:.3f} GB in {seconds:.1f} s -> {plan.target_dir}", file=sys.stderr)
    return 0


def _who(world) -> str:
    return f" [rank {world.rank}/{world.size}]" if world.size > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
