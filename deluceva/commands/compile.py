"""`deluceva compile`: choose dense or delta per node from a profile, write PLAN.json."""

from __future__ import annotations

import sys
import warnings

from deluceva.errors import DelucevaError

__all__ = ["add_parser", "handle"]


def add_parser(commands, percentage, positive_int) -> None:
    parser = commands.add_parser("compile", help="choose dense or delta per node from a profile",
                                 description=__doc__.splitlines()[0])
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("--profile", required=True, metavar="PROFILE.json", help="from `deluceva profile`")
    parser.add_argument("--percentage", type=percentage, nargs="+", metavar="P",
                        help="filtering percentage(s) to plan for (default: every one the profile measured, and 0.6, 0.65, 0.7, 0.75, 0.85 between them)")
    parser.add_argument("--force", action="store_true", help="use a profile measured on another machine (warns)")
    parser.add_argument("-o", "--output", required=True, metavar="PLAN.json", help="where to write the plan")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    from deluceva.planner import load_model
    from deluceva.planner.load_model import declared_input_shape
    from deluceva.planner.plan_file import compile_plan
    from deluceva.profiles import load_profile

    from deluceva.files import check_output

    output = check_output(args.output, ".json", "-o")
    profile = load_profile(args.profile)
    shape = tuple(profile.model["input_shape"])
    declared = declared_input_shape(args.model)
    if any(have is not None and have != want for have, want in zip(declared[1:], shape[1:])):
        raise DelucevaError(f"{args.profile}: profile was measured for input shape {shape}; {args.model} takes "
                            f"{tuple(1 if d is None else d for d in declared)}: profile it again")
    model = load_model(args.model, shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = compile_plan(model, profile, args.percentage, force=args.force)
    for warning in caught:
        print(f"deluceva: warning: {warning.message}", file=sys.stderr)
    plan.save(output)
    totals = plan.data["totals"]
    for i, p in enumerate(plan.percentages):
        variants = [n["variant"][i] for n in plan.data["nodes"]]
        print(f"p={p:g}: {variants.count('delta')} delta / {variants.count('dense')} dense nodes, predicted "
              f"{totals['plan_ms'][i]:.2f} ms/frame (all dense {totals['all_dense_ms'][i]:.2f}, "
              f"all delta {totals['all_delta_ms'][i]:.2f})")
    print(f"plan: {output}")
    return 0
