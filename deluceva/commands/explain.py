"""`deluceva explain`: a compiled plan as a table (and a drawing), with totals against all-dense.

Per node: its variant; the cost model's predicted ms for it and what the profile measured for
it (dense: the node alone in its own onnxruntime session; delta: its step's mean over the
profile's frames at that percentage; a fused group's delta time is its head's); the predicted
dense and delta ms the choice was made from; the expected input density; the reason. Given a
run's `--summary`, also the frames each delta step ran in its delta form and in its dense form.
"""

from __future__ import annotations

from pathlib import Path


__all__ = ["add_parser", "handle", "explain_table", "draw_plan"]

COLOURS = {"dense": "#4c78a8", "delta": "#f58518"}


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def explain_table(plan, percentage: float, forms: dict | None = None) -> str:
    """EXPLAIN: one row per node, then totals against all-dense and all-delta.

    `forms`: a run summary's `step_forms` (frames per delta step in each form), shown per node.
    """
    i = plan.nearest_index(percentage)
    header = ["node", "op", "output shape", "variant", "predicted ms", "measured ms", "dense ms", "delta ms",
              "density", *(["frames delta/dense form"] if forms is not None else []), "reason"]
    rows = []
    for node in plan.data["nodes"]:
        shape = "x".join(str(d) for d in node["output_shape"]) if node["output_shape"] else "-"
        density = node["density"][i]
        ran = []
        if forms is not None:
            counts = forms.get(f"delta[{node['name']}]")
            ran = [f"{counts['delta']}/{counts['dense']}" if counts else "-"]
        rows.append([node["name"], node["op_type"], shape, node["variant"][i], _ms(node["predicted_ms"][i]),
                     _ms(node["measured_ms"][i]), _ms(node["dense_ms"]), _ms(node["delta_ms"][i]),
                     "-" if density is None else f"{density:.2f}", *ran, node["reason"][i]])
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in [header] + rows]
    totals = plan.data["totals"]
    plan_ms, dense_ms, delta_ms = (totals[k][i] for k in ("plan_ms", "all_dense_ms", "all_delta_ms"))
    variants = [n["variant"][i] for n in plan.data["nodes"]]
    speedup = f", {dense_ms / plan_ms:.2f}x" if plan_ms else ""
    lines.append("")
    lines.append(f"plan for p={plan.percentages[i]:g}: {variants.count('delta')} delta, {variants.count('dense')} dense nodes")
    lines.append(f"predicted per frame: plan {_ms(plan_ms)} ms, all dense {_ms(dense_ms)} ms{speedup}, "
                 f"all delta {_ms(delta_ms)} ms")
    return "\n".join(lines)


def draw_plan(plan, percentage: float, path: str | Path) -> Path:
    """Draw the DAG, nodes coloured by variant, to a .png or .svg file (matplotlib)."""
    import networkx as nx

    from deluceva.commands._plotting import pyplot

    plt = pyplot("--graph")
    from matplotlib.patches import Patch

    from deluceva.files import check_output

    path = check_output(path, (".png", ".svg"), "--graph")
    i = plan.nearest_index(percentage)
    graph = nx.DiGraph()
    for node in plan.data["nodes"]:
        graph.add_node(node["name"], variant=node["variant"][i], op=node["op_type"])
    graph.add_edges_from(map(tuple, plan.data["edges"]))
    # Layers by longest path from the inputs, drawn top to bottom: the model's flow.
    for layer, names in enumerate(nx.topological_generations(graph)):
        for name in names:
            graph.nodes[name]["layer"] = layer
    layout = nx.multipartite_layout(graph, subset_key="layer", align="horizontal") if len(graph) else {}
    layout = {n: (x, -y) for n, (x, y) in layout.items()}
    height = max(4.0, min(60.0, 0.35 * (max((d["layer"] for _, d in graph.nodes(data=True)), default=0) + 1)))
    figure, axes = plt.subplots(figsize=(10, height))
    colours = [COLOURS[graph.nodes[n]["variant"]] for n in graph.nodes]
    nx.draw_networkx_edges(graph, layout, ax=axes, arrows=True, arrowsize=6, width=0.5, edge_color="#999999")
    nx.draw_networkx_nodes(graph, layout, ax=axes, node_color=colours, node_size=120)
    if len(graph) <= 60:
        nx.draw_networkx_labels(graph, layout, {n: graph.nodes[n]["op"] for n in graph.nodes}, ax=axes, font_size=6)
    axes.legend(handles=[Patch(color=c, label=v) for v, c in COLOURS.items()], loc="upper right")
    axes.set_title(f"{Path(plan.data['model']['path']).name}: plan for p={plan.percentages[i]:g}")
    axes.axis("off")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def add_parser(commands, percentage, positive_int) -> None:
    parser = commands.add_parser("explain", help="show a compiled plan: variants, costs and reasons",
                                 description=__doc__.splitlines()[0])
    parser.add_argument("plan", metavar="PLAN.json", help="from `deluceva compile`")
    parser.add_argument("--percentage", type=percentage, default=None, metavar="P",
                        help="which of the plan's percentages to show (nearest; default: the lowest)")
    parser.add_argument("--graph", metavar="FILE.png|.svg", help="also draw the DAG coloured by variant")
    parser.add_argument("--summary", metavar="SUMMARY.json",
                        help="a run's --summary: also show the frames each delta step ran in its delta and dense form")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    from deluceva.planner.plan_file import load_plan

    plan = load_plan(args.plan)
    p = plan.percentages[0] if args.percentage is None else args.percentage
    forms = None
    if args.summary:
        forms = _read_step_forms(args.summary)
    if args.graph:
        draw_plan(plan, p, args.graph)
    print(explain_table(plan, p, forms))
    if args.graph:
        print(f"graph: {args.graph}")
    return 0


def _read_step_forms(path: str) -> dict:
    """The `step_forms` of a run summary, or a one-line error naming the file."""
    import json

    from deluceva.errors import DelucevaError

    try:
        with open(path) as handle:
            summary = json.load(handle)
    except (OSError, ValueError) as error:
        raise DelucevaError(f"{path}: cannot read the run summary: {error}") from None
    forms = summary.get("step_forms") if isinstance(summary, dict) else None
    if not isinstance(forms, dict):
        raise DelucevaError(f"{path}: not a run summary with step_forms (written by `deluceva run --summary`)")
    return forms
