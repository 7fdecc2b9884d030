"""The ``protoseg`` click group.

Commands are thin: they parse options, call one engine/exporters function and print the
result on stdout (progress and logs go to stderr). Domain errors become one-line
``click.ClickException`` messages (exit 1); bad flag combinations are usage errors
(exit 2). ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from engine import __version__
from cli._errors import handle_errors
from engine.errors import CaseSkippedWarning

__all__ = ["cli", "main"]

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_MODEL = DATA_DIR / "deepbrain" / "deepbrain.onnx"
DEMO_DATA = DATA_DIR / "colin27"

log = logging.getLogger("protoseg")

def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default, allow_nan=False))


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _clean(v: Any) -> Any:
    """NaN → None so that JSON stays valid."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Plain-text table (no dependency): left-aligned text, right-aligned numbers."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(_isnum(r.get(c)) for r in rows) for c in columns]

    def fmt(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric)).rstrip()

    lines = [fmt(columns), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _isnum(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or v is None


def _progress(quiet: bool, desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm progress bar on stderr (cases, cases/s, ETA); silent when quiet or not a tty."""
    if quiet or not sys.stderr.isatty():
        return (lambda done, total: None), (lambda: None)
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, initial=done, desc=desc, unit="case", file=sys.stderr,
                              dynamic_ncols=True)
        else:
            bar["bar"].update(done - bar["bar"].n)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return update, close


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if verbose:
        level = logging.INFO if verbose == 1 else logging.DEBUG
    if quiet:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("protoseg: %(message)s"))
    root = logging.getLogger("protoseg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


#: Skipped cases listed one line each on stderr before the rest are only counted (-v lists all).
MAX_CASE_LINES = 10
#: Skipped cases are said even under --quiet (its own level; the "protoseg" handler prints it).
_CASES_LOG = logging.getLogger("protoseg.cases")
_CASES_LOG.setLevel(logging.WARNING)


class _CaseLines:
    """The CLI's warning display: one line per warning through the ``protoseg`` logger,
    skipped cases as ``case 'x' skipped: why``, at most :data:`MAX_CASE_LINES` of them unless
    ``-v`` (the store's case statuses keep every reason)."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.shown, self.hidden = limit, 0, 0

    def __call__(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
        log = logging.getLogger("protoseg")
        text = " ".join(str(message).split())
        if not issubclass(category, UserWarning):  # library deprecations: debug output only
            log.debug("%s: %s (%s:%d)", category.__name__, text, filename, lineno)
            return
        if not isinstance(message, CaseSkippedWarning):
            log.warning("warning: %s", text)
            return
        if self.limit is not None and self.shown >= self.limit:
            self.hidden += 1
            return
        self.shown += 1
        _CASES_LOG.warning("case %r skipped: %s", message.case_id, " ".join(message.reason.split()))

    def close(self) -> None:
        if self.hidden:
            _CASES_LOG.warning(
                "... and %d more skipped case%s (-v lists them; the store's case statuses say why)",
                self.hidden, "" if self.hidden == 1 else "s")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="protoseg")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """protoseg: what can each layer of a segmentation network segment?

    Scores the hidden layers of any ONNX segmentation model with ProtoSeg
    segmentation-ability (SA) scores, estimates output quality without ground
    truth, and writes framework-independent reports.

    \b
    Start with the demo (a real 3-D U-Net on a real T1 MRI, all offline):
      protoseg demo -o protoseg-demo
    Then on your own model and data:
      protoseg inspect model.onnx
      protoseg score model.onnx cases/ -o run.h5 --level both
      protoseg report run.h5 -o report/
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["verbose"] = verbose
    _setup_logging(verbose, quiet=False)
    # a skipped case's warning is one line on stderr like every other message (no source
    # line, no "datasets.py:463: UserWarning:" prefix); --quiet hides it with the rest.
    # Restored when the command ends (the CLI also runs in-process, under tests).
    ctx.with_resource(warnings.catch_warnings())
    lines = _CaseLines(None if verbose else MAX_CASE_LINES)
    warnings.showwarning = lines
    warnings.simplefilter("always", UserWarning)  # two cases with one message are two lines
    ctx.call_on_close(lines.close)


# ---------------------------------------------------------------- inspect
def _tensor_dict(t: Any) -> dict[str, Any]:
    return {
        "name": t.name,
        "layer": t.layer,
        "op": t.op,
        "shape": [d if isinstance(d, int) else (None if d is None else str(d)) for d in t.shape],
        "dtype": t.dtype,
        "exported": bool(getattr(t, "exported", False)),
    }


def _io_dict(vi: Any) -> dict[str, Any]:
    import onnx

    tt = vi.type.tensor_type
    shape = []
    for d in tt.shape.dim:
        shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    except (KeyError, ValueError, TypeError):  # pragma: no cover - exotic types
        dtype = str(tt.elem_type)
    return {"name": vi.name, "layer": vi.name, "op": "input/output", "shape": shape, "dtype": dtype}


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--layers", default="all", show_default=True,
              help="Only list tensors matching this selector: all, auto (the layers an exporter named), "
                   "name, layer, glob, re:REGEX, op:OpType.")
@click.option("--input-shape", help="An input shape, batch first (e.g. 1,1,256,256): also show each tensor's "
                                    "size for it and the bytes per case that scoring would hold.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with inputs, outputs, hidden.")
@handle_errors
def inspect(model: Path, layers: str, input_shape: str | None, as_json: bool) -> None:
    """Show a model's inputs, outputs and the hidden tensors protoseg can score.

    Symbolic dims (a dynamic batch or spatial size) are shown by name, unknown ones as ?;
    with --input-shape they are resolved for that input, as `score` resolves them for
    the data.

    \b
    Example:
      protoseg inspect model.onnx
      protoseg inspect model.onnx --layers 'op:Conv' --json
      protoseg inspect model.onnx --input-shape 1,1,512,512
    """
    from engine.model.graph import activation_bytes, list_hidden_tensors, load_model, select_tensors
    from engine.model.shapes import resolve_shapes

    proto = load_model(model)
    init_names = {i.name for i in proto.graph.initializer}
    inputs = [_io_dict(v) for v in proto.graph.input if v.name not in init_names]
    outputs = [_io_dict(v) for v in proto.graph.output]
    hidden = list_hidden_tensors(proto)
    if layers != "all":
        hidden = select_tensors(hidden, _split_selectors(layers))
    n_exported = sum(t.exported for t in hidden)
    tensors = [_tensor_dict(t) for t in hidden]
    cols = ["name", "layer", "op", "shape", "dtype"]
    total = None
    if input_shape:
        shape = _shape(input_shape, "--input-shape")
        if not inputs or len(shape) != len(inputs[0]["shape"]):
            raise click.BadParameter(
                f"{input_shape!r} has {len(shape)} dims; the model's input {inputs[0]['name']!r} has "
                f"shape {inputs[0]['shape']}" if inputs else "the model has no input",
                param_hint="--input-shape")
        sized = resolve_shapes(proto, hidden, inputs[0]["name"], shape)
        total = 0
        for d, t in zip(tensors, sized):
            d["resolved_shape"] = [int(v) if isinstance(v, int) else None for v in t.shape[1:]]
            d["bytes_per_case"] = activation_bytes(t, 1)
            total += d["bytes_per_case"]
        cols += ["resolved", "MiB/case"]
    if as_json:
        out = {"model": str(model), "inputs": inputs, "outputs": outputs, "hidden": tensors}
        if total is not None:
            out["input_shape"], out["bytes_per_case"] = list(shape), total
        _echo_json(out)
        return

    def rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**d, "name": ("* " if d.get("exported") else "") + d["name"],
                 "shape": "x".join("?" if s is None else str(s) for s in d["shape"]),
                 "resolved": "x".join(str(s) for s in d.get("resolved_shape") or ()),
                 "MiB/case": f"{d.get('bytes_per_case', 0) / 2**20:.2f}"} for d in items]

    click.echo(f"model: {model}")
    click.echo("\ninputs:")
    click.echo(_table(rows(inputs), ["name", "shape", "dtype"]))
    click.echo("\noutputs:")
    click.echo(_table(rows(outputs), ["name", "shape", "dtype"]))
    click.echo(f"\nhidden tensors ({len(hidden)}" + (
        f"; {n_exported} exported and named, marked *, scored by default" if n_exported else "") + "):")
    click.echo(_table(rows(tensors), cols))
    if total is not None:
        click.echo(f"\nfor input {'x'.join(map(str, shape))}: {total / 2**20:.1f} MiB per case if every "
                   "listed tensor is scored; score holds one pass of them per batch (x --batch-size, "
                   "split into passes under the memory budget)")


def _split_selectors(value: str | tuple[str, ...]) -> str | list[str]:
    if isinstance(value, tuple):
        items = [v for part in value for v in part.split(",") if v]
    else:
        items = [v for v in value.split(",") if v]
    if not items:
        return "auto"
    if items in (["all"], ["auto"]):
        return items[0]
    return items


# ---------------------------------------------------------------- score
#: Options that only mean something when a model is run (refused by `estimate STORE`).
_SCORING_ONLY = ("layers", "resize", "threshold", "batch_size", "provider", "optimization", "card_toml",
                 "activation", "prediction_output", "layout", "scaling", "classes", "save_maps",
                 "no_input_sa", "nonfinite", "strict", "max_cases", "shard", "resume", "overwrite",
                 "max_memory", "volume", "input_size", "reorient", "cluster", "chunk_size",
                 "deterministic", "size_multiple")


class _Size(click.ParamType):
    """A memory size: bytes, or a number with a unit (4GiB, 512MB, 1.5G, 1e9)."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        from engine.memory import parse_size

        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _score_options(func: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("-o", "--output", "store", type=click.Path(dir_okay=False, path_type=Path),
                     help="HDF5 store to write (work in progress lives in STORE.parts/)."),
        click.option("--layers", multiple=True, default=("auto",), show_default=True,
                     help="Hidden tensors to score: auto (the layers the exporter named, else all), all, "
                          "names, layer names, globs, re:REGEX, op:OpType (repeat or comma-separate)."),
        click.option("--resize", type=click.Choice(["upsample", "downsample"]), default="upsample",
                     show_default=True, help="Bring features to the input grid, or masks to each tensor's grid."),
        click.option("--threshold", type=float, default=None,
                     help="Probability threshold of the prediction [default: the model card's, else 0.5]."),
        click.option("--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Cases per model run (bounds memory)."),
        click.option("--max-memory", type=_Size(), metavar="SIZE",
                     help="Memory the run may use (4GiB, 512MB...); a quarter of it bounds the hidden "
                          "tensors exposed per model run, split into more passes when needed "
                          "[default: what is free, within cgroup and ulimit -v/-d limits]."),
        click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True, help="onnxruntime execution provider (auto: CUDA only when it loads)."),
        click.option("--optimization", type=click.Choice(["disable", "basic", "extended", "all"]),
                     default="all", show_default=True, help="onnxruntime graph optimisation level."),
        click.option("--card", "card_toml", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TOML model card (prediction output, activation, layout, preprocessing)."),
        click.option("--activation", type=click.Choice(["sigmoid", "softmax", "logits"]),
                     help="What the prediction output ALREADY holds, as the model computes it (not an "
                          "activation to apply): sigmoid = per-channel probabilities in [0, 1], softmax "
                          "= probabilities summing to 1 over channels, logits = raw scores (protoseg "
                          "applies sigmoid/softmax to them). Overrides the model card."),
        click.option("--prediction-output", help="Graph output holding the prediction (overrides the card)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC", "NCDHW", "NDHWC", "NCW", "NWC"]),
                     help="Input layout (overrides the card)."),
        click.option("--size-multiple", type=click.IntRange(min=2), metavar="M",
                     help="Pad each image with zeros at the end of each axis up to a multiple of M before "
                          "the model (a U-Net's pooling needs it), and score on the image's own grid "
                          "(overrides the card's size_multiple)."),
        click.option("--input-size", metavar="H,W[,D]",
                     help="Resize every image to this spatial size before the model (linear): for a "
                          "model that needs one size, or to score images of sizes it cannot take. "
                          "Default: the model's fixed size, else each image at its own size."),
        click.option("--scaling", type=click.Choice(["none", "minmax", "zscore", "meanstd"]),
                     help="Intensity scaling before the model (overrides the card)."),
        click.option("--classes", help="Classes to score one-vs-rest, comma-separated (e.g. 1,2,3)."),
        click.option("--maps", "save_maps", multiple=True,
                     help="Save SA and probability maps for these case ids (repeatable), or N for the first N."),
        click.option("--no-input-sa", is_flag=True, help="Do not score the raw input channels."),
        click.option("--nonfinite", type=click.Choice(["raise", "skip"]), default="raise", show_default=True,
                     help="NaN/Inf in a hidden tensor: stop, or score NaN with a status and go on."),
        click.option("--strict", is_flag=True, help="Stop at the first unreadable case instead of skipping it."),
        click.option("--volume", type=click.IntRange(min=0), metavar="T",
                     help="Score volume T (from 0) of time series (4-D NIfTI whose header gives the 4th "
                          "axis a time unit, NRRD/TIFF time axes) [default: such cases are skipped]."),
        click.option("--deterministic", is_flag=True,
                     help="Make the model's numbers repeat exactly on a GPU: onnxruntime's deterministic "
                          "compute, no TF32, a fixed cuDNN algorithm (slower; no effect on the CPU's numbers)."),
        click.option("--reorient/--no-reorient", default=None,
                     help="Bring every 3-D NIfTI/NRRD case (image and mask) to the model card's orientation "
                          "(RAS when it names none) before the model, by axis flips and permutations only "
                          "(no resampling), or permute each file's axes as the card says (orientation "
                          "'zyx': reversed, as nnU-Net's default readers feed the network); --no-reorient "
                          "keeps voxels in file order, either way [default: as the model card's "
                          "orientation says, else file order]."),
        click.option("--max-cases", type=click.IntRange(min=1), help="Score only the first N cases."),
        click.option("--shard", metavar="I/N", help="Score only cases with index % N == I (one worker of N; "
                     "join the stores with `protoseg merge`)."),
        click.option("--cluster", metavar="ADDRESS",
                     help="Score on a Dask cluster: tcp://HOST:PORT of a running scheduler, or local:N for "
                          "N worker processes on this machine (needs protoseg[dask]; docs/distributed.md)."),
        click.option("--chunk-size", type=click.IntRange(min=1), metavar="N",
                     help="With --cluster: cases per task, a multiple of --batch-size [default: about four "
                          "chunks per worker, at most 8 batches]."),
        click.option("--resume/--no-resume", default=True, show_default=True,
                     help="Continue an interrupted run made with the same settings (a finished one is "
                          "left as is); --no-resume refuses an existing store."),
        click.option("--overwrite", is_flag=True, help="Replace an existing store made with other settings."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary table."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _card_overrides(card_toml: Path | None, activation: str | None, prediction_output: str | None,
                    layout: str | None, scaling: str | None, classes: str | None,
                    input_size: str | None = None, size_multiple: int | None = None) -> Any:
    overrides: dict[str, Any] = {}
    if size_multiple:
        overrides["size_multiple"] = (int(size_multiple),)
    if input_size:
        size = _shape(input_size, "--input-size")
        if not size or any(v < 1 for v in size):
            raise click.BadParameter(f"expected positive sizes such as 256,256, got {input_size!r}",
                                     param_hint="--input-size")
        overrides["input_size"], overrides["resize"] = size, True
    if activation:
        overrides["activation"] = activation
    if prediction_output:
        overrides["prediction_output"] = prediction_output
    if layout:
        overrides["layout"] = layout
    if scaling:
        overrides["scaling"] = scaling
    if classes:
        try:
            overrides["classes"] = tuple(int(c) for c in classes.split(",") if c.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {classes!r}",
                                     param_hint="--classes") from None
    if card_toml is not None and overrides:
        return {"_toml": str(card_toml), **overrides}
    if card_toml is not None:
        return card_toml
    return overrides or None


def _maps_arg(save_maps: tuple[str, ...]) -> Any:
    if len(save_maps) == 1 and save_maps[0].isdigit():
        return int(save_maps[0])
    return [s for part in save_maps for s in part.split(",") if s]


def _check_cluster_flags(cluster: str | None, chunk_size: int | None, shard: str | None) -> None:
    if chunk_size is not None and cluster is None:
        raise click.UsageError("--chunk-size applies with --cluster only")
    if cluster is not None and shard is not None:
        raise click.UsageError("--cluster and --shard exclude each other: the cluster cuts the data into "
                               "chunks itself (--shard is for one machine of a batch array)")


def _check_store_flags(resume: bool, overwrite: bool) -> None:
    ctx = click.get_current_context()
    explicit = ctx.get_parameter_source("resume") == click.core.ParameterSource.COMMANDLINE
    if resume and overwrite and explicit:
        raise click.UsageError("--resume and --overwrite contradict each other; choose one")


def layer_summary(store: Any) -> list[dict[str, Any]]:
    """Per layer (and class): mean ± sd SA, cases used, NaN count and why.

    A view of :func:`engine.report.layer_summary` (the report's table) shaped for the
    terminal and ``--json``: undefined statistics are None, NaN reasons one string.
    """
    import math

    from engine.report import layer_summary as report_layer_summary

    import numpy as np

    from engine.status import Status

    ls = store.layer_scores()
    case_status = np.asarray(store.cases["status"]).astype(str)
    classes = list(store.classes)
    rows = []
    for r in report_layer_summary(ls["score"], ls["status"], store.layers, classes):
        why = {k[len("nan_"):]: v for k, v in r.items() if k.startswith("nan_") and v}
        if why.pop(Status.NOT_COMPUTED.name, 0):
            # not computed because the case was skipped: say why (its case status)
            k, li = classes.index(r["class"]), int(r["layer_index"])
            skipped = case_status[ls["status"][:, k, li] == int(Status.NOT_COMPUTED)]
            for reason in skipped:
                key = Status.NOT_COMPUTED.name if reason == "ok" else str(reason)
                why[key] = why.get(key, 0) + 1
        rows.append({
            "layer": r["layer"],
            "tensor": r["name"],
            "class": r["class"],
            "mean": r["mean"] if math.isfinite(r["mean"]) else None,
            "sd": r["sd"] if math.isfinite(r["sd"]) else None,
            "cases": r["n_used"],
            "nan": r["n_nan"],
            "why": ", ".join(f"{k}: {v}" for k, v in why.items()),
        })
    return rows


def _print_layer_summary(rows: list[dict[str, Any]], multi_class: bool) -> None:
    shown = []
    for r in rows:
        m, sd = r["mean"], r["sd"]
        sa = "nan" if m is None else (f"{m:.3f}" + ("" if sd is None else f" ± {sd:.3f}"))
        row = {"layer": r["layer"], "SA (mean ± sd)": sa, "cases": r["cases"], "NaN": r["nan"],
               "why NaN": r["why"]}
        if multi_class:
            row = {"class": r["class"], **row}
        shown.append(row)
    cols = (["class"] if multi_class else []) + ["layer", "SA (mean ± sd)", "cases", "NaN", "why NaN"]
    click.echo(_table(shown, cols))


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@_score_options
@click.option("--level", type=click.Choice(["layer", "unit", "both"]), default="layer", show_default=True,
              help="Layer-level SA (all channels), unit-level SA (each channel), or both.")
@click.option("--guide", type=click.Choice(["prediction", "ground_truth"]), default="prediction",
              show_default=True, help="Where the prototypes come from.")
@click.option("--soft-guide", is_flag=True, help="Use the predicted probability as soft guide weights.")
@click.option("--reference", type=click.Choice(["auto", "ground_truth", "prediction"]), default="auto",
              show_default=True, help="What maps are scored against (auto: ground truth when masks exist).")
@handle_errors
def score(model: Path, data: Path, store: Path, layers: tuple[str, ...], level: str, guide: str,
          soft_guide: bool, reference: str, resize: str, threshold: float | None, batch_size: int,
          provider: str, optimization: str, card_toml: Path | None, activation: str | None,
          prediction_output: str | None, layout: str | None, scaling: str | None, classes: str | None,
          save_maps: tuple[str, ...], no_input_sa: bool, nonfinite: str, strict: bool,
          max_cases: int | None, shard: str | None, resume: bool, overwrite: bool, quiet: bool,
          as_json: bool, max_memory: int | None = None, volume: int | None = None,
          input_size: str | None = None, reorient: bool | None = None, cluster: str | None = None,
          chunk_size: int | None = None, deterministic: bool = False,
          size_multiple: int | None = None) -> None:
    """Score every hidden layer of MODEL on the cases in DATA into an HDF5 store.

    DATA is a folder of image/mask pairs (NIfTI, NRRD, PNG/JPEG/TIFF, .npy), one
    HDF5/NPZ file with `images` (and optional `masks`), or a single image.

    \b
    Example:
      protoseg score model.onnx cases/ -o run.h5 --level both --maps 2
      protoseg score model.onnx cases/ -o run.h5 --resume     # after an interruption
    """
    from engine import open_store
    from engine.run import score_dataset

    if store is None:
        raise click.UsageError("missing option -o/--output: the HDF5 store to write")
    _check_store_flags(resume, overwrite)
    _check_cluster_flags(cluster, chunk_size, shard)
    if guide == "ground_truth" and soft_guide:
        raise click.UsageError("--soft-guide applies to --guide prediction only")
    if quiet:
        _setup_logging(0, quiet=True)
    update, close = _progress(quiet, "scoring")
    try:
        summary = score_dataset(
            model, data, store, layers=_split_selectors(layers), level=level, guide=guide,
            guide_kind="soft" if soft_guide else "hard", reference=reference, resize=resize,
            threshold=threshold, batch_size=batch_size, provider=provider, optimization=optimization,
            card=_card_overrides(card_toml, activation, prediction_output, layout, scaling, classes,
                                 input_size, size_multiple),
            save_maps=_maps_arg(save_maps), input_sa=not no_input_sa, nonfinite=nonfinite,
            resume=resume, overwrite=overwrite, strict=strict, max_cases=max_cases, shard=shard,
            max_memory=max_memory, volume=volume, reorient=reorient, deterministic=deterministic,
            progress=update,
            client=cluster, chunk_size=chunk_size,
        )
    finally:
        close()
    st = open_store(summary.store)
    rows = layer_summary(st)
    if as_json:
        _echo_json(_clean({"store": str(summary.store), "provider": summary.provider,
                           "cases": summary.n_cases, "scored": summary.n_scored,
                           "resumed_skipped": summary.n_skipped_done, "failed": summary.n_failed,
                           "no_reference": summary.n_no_reference,
                           "seconds": round(summary.seconds, 3), "layers": rows,
                           **({"cluster": summary.cluster_json()} if cluster else {})}))
        return
    if not quiet:
        _print_layer_summary(rows, multi_class=len(st.classes) > 1)
        no_ref = f"{summary.n_no_reference} without mask, " if summary.n_no_reference else ""
        click.echo(f"\nstore: {summary.store}  ({summary.n_cases} cases, {summary.n_failed} failed, "
                   f"{no_ref}provider {summary.provider}, {summary.seconds:.1f} s)")
        if cluster:
            c = summary.cluster_json()
            click.echo(f"chunks: {c['done']} done, {c['skipped']} skipped, {c['retried']} retried, "
                       f"{c['failed']} failed; seconds per worker: "
                       + ", ".join(f"{k} {v:.1f}" for k, v in c["worker_seconds"].items()))
    else:
        click.echo(str(summary.store))


# ---------------------------------------------------------------- estimate
@cli.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("data", type=click.Path(exists=True, path_type=Path), required=False)
@_score_options
@click.option("--estimator", type=click.Choice(["paper", "all-layers", "calibrated", "combined"]), multiple=True,
              help="Estimators to compute (repeatable) [default: paper and all-layers, "
                   "plus calibrated with --calibration]; combined = SA and baselines in a ridge "
                   "model stored in the calibration.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration file: read it when it exists, else fit it on DATA's masks and save it.")
@click.option("--rank-by", default=None, help="Estimator used to rank and flag [default: the first].")
@click.option("--flag-below", type=float, help="Flag cases whose estimate is below this value.")
@click.option("--flag-lowest", type=click.IntRange(min=1), help="Flag the N least-supported cases.")
@click.option("--flag-fraction", type=click.FloatRange(0, 1, min_open=True), help="Flag this fraction of cases.")
@click.option("--dice-threshold", type=float, default=0.8, show_default=True,
              help="Validation: cases with true Dice below this are 'bad' (AUROC).")
@click.option("--coverage", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Per-case lower bound on Dice at this coverage (e.g. 0.9; split conformal, needs "
                   "--calibration); cases are ranked and flagged by the bound.")
@click.option("--bound-method", type=click.Choice(["normalized", "constant"]), default=None,
              help="Dice lower bound: normalized = estimate - q * (per-case label-free difficulty "
                   "scale), constant = estimate - q [default: normalized when the calibration holds "
                   "it, else constant].")
@click.option("--model", "store_model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With a STORE written by an older protoseg: the model it was scored with.")
@handle_errors
def estimate(source: Path, data: Path | None, store: Path | None, layers: tuple[str, ...], resize: str,
             threshold: float | None, batch_size: int, provider: str, optimization: str,
             card_toml: Path | None, activation: str | None, prediction_output: str | None,
             layout: str | None, scaling: str | None, classes: str | None, save_maps: tuple[str, ...],
             no_input_sa: bool, nonfinite: str, strict: bool, max_cases: int | None,
             shard: str | None, resume: bool,
             overwrite: bool, quiet: bool, as_json: bool, estimator: tuple[str, ...],
             calibration: Path | None, rank_by: str | None, flag_below: float | None,
             flag_lowest: int | None, flag_fraction: float | None, dice_threshold: float,
             coverage: float | None, bound_method: str | None, store_model: Path | None,
             max_memory: int | None = None,
             volume: int | None = None, input_size: str | None = None,
             reorient: bool | None = None, cluster: str | None = None, chunk_size: int | None = None,
             deterministic: bool = False, size_multiple: int | None = None) -> None:
    """Label-free quality estimate (mean SA) per case, least supported first.

    With MODEL DATA, scores DATA with the network's own prediction as both guide and
    reference (He et al. 2023, so no ground truth is needed) into the store -o, then
    estimates. With a STORE scored that way earlier (by `estimate` or `demo`), estimates
    from its scores without running the model, and adds the estimates to that store.
    When there are masks, each estimator is also validated against the prediction's true
    Dice, beside trivial baselines.

    \b
    Example:
      protoseg estimate model.onnx cases/ -o est.h5 --flag-lowest 5
      protoseg estimate est.h5 --flag-fraction 0.1          # again, from the scores
      protoseg estimate model.onnx labelled/ -o cal.h5 --calibration cal.json
      protoseg estimate model.onnx new/ -o new.h5 --calibration cal.json
    """
    from engine.run import estimate_dataset, estimate_store

    rules = [r for r in (flag_below, flag_lowest, flag_fraction) if r is not None]
    if len(rules) > 1:
        raise click.UsageError("give at most one of --flag-below, --flag-lowest, --flag-fraction")
    if quiet:
        _setup_logging(0, quiet=True)
    common = dict(estimators=list(estimator) or None, calibration=calibration, rank_by=rank_by,
                  flag_below=flag_below, flag_lowest=flag_lowest, flag_fraction=flag_fraction,
                  dice_threshold=dice_threshold, coverage=coverage, bound_method=bound_method)
    if data is None:
        _check_store_only(source, store)
        result = estimate_store(source, model=store_model, **common)
    else:
        if store is None:
            raise click.UsageError("missing option -o/--output: the HDF5 store to write "
                                   "(or give only a STORE to estimate from its scores)")
        if store_model is not None:
            raise click.UsageError("--model applies to `estimate STORE`; with MODEL DATA the model is MODEL")
        _check_store_flags(resume, overwrite)
        _check_cluster_flags(cluster, chunk_size, shard)
        update, close = _progress(quiet, "estimating")
        try:
            result = estimate_dataset(
                source, data, store, layers=_split_selectors(layers), resize=resize,
                threshold=threshold, batch_size=batch_size, provider=provider,
                optimization=optimization,
                card=_card_overrides(card_toml, activation, prediction_output, layout, scaling, classes,
                                 input_size, size_multiple),
                save_maps=_maps_arg(save_maps), input_sa=not no_input_sa, nonfinite=nonfinite,
                resume=resume, overwrite=overwrite, strict=strict, max_cases=max_cases, shard=shard,
                max_memory=max_memory, volume=volume, reorient=reorient, deterministic=deterministic,
                progress=update, client=cluster, chunk_size=chunk_size, **common)
        finally:
            close()
    if as_json:
        _echo_json(_clean(result))
        return
    rows = result["ranking"]
    cols = ["rank", "case", "group", result["rank_by"]] + [
        e for e in result["estimators"] if e != result["rank_by"]] + ["predicted_fraction", "flag"]
    if result.get("coverage") is not None:
        cols.insert(3, "dice_lower_bound")
    if any(r.get("true_dice") is not None for r in rows):
        cols.append("true_dice")
    shown = [{c: (f"{r[c]:.4f}" if isinstance(r.get(c), float) else r.get(c)) for c in cols} for r in rows]
    click.echo(_table(shown, cols))
    if result.get("validation"):
        click.echo("\nvalidation against true Dice (Spearman ρ [95% CI], AUROC for Dice < "
                   f"{dice_threshold}):")
        vrows = [{"estimate": v["name"],
                  "spearman": _fmt_ci(v.get("spearman"), v.get("spearman_ci")),
                  "pearson": _fmt_ci(v.get("pearson"), v.get("pearson_ci")),
                  "partial|volume": _fmt(v.get("partial_spearman")),
                  "auroc": _fmt(v.get("auroc")),
                  "aurc": _fmt_ci(v.get("aurc"), v.get("aurc_ci")),
                  "e-aurc": _fmt(v.get("e_aurc")), "n": v.get("n")} for v in result["validation"]]
        click.echo(_table(vrows, ["estimate", "spearman", "pearson", "partial|volume", "auroc", "aurc",
                                  "e-aurc", "n"]))
    if result.get("coverage_check"):
        cc = result["coverage_check"]
        click.echo(f"\nDice lower bound (coverage {cc['nominal']:g}, {result.get('bound_method')} split "
                   f"conformal): {cc['covered']} of {cc['n']} labelled cases covered ({_fmt(cc['coverage'])})")
    elif result.get("bound_method"):
        click.echo(f"\nDice lower bound: coverage {result['coverage']:g}, {result['bound_method']} split "
                   "conformal (no ground truth here to check it)")
    if result.get("bound_note"):
        click.echo(f"note: {result['bound_note']}")
    click.echo(f"\nstore: {result['store']}  ({len(rows)} cases, {sum(bool(r['flag']) for r in rows)} flagged)")


def _check_store_only(source: Path, store: Path | None) -> None:
    """`estimate STORE`: refuse what only applies when a model is run."""
    ctx = click.get_current_context()
    given = [name for name in _SCORING_ONLY + ("store",)
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if source.suffix.lower() == ".onnx":
        raise click.UsageError(f"missing argument DATA: give MODEL DATA -o STORE to score {source.name} "
                               "and estimate, or a STORE scored earlier")
    if source.is_dir():
        raise click.UsageError(f"{source} is a folder; give MODEL DATA to score it, or a STORE (.h5) "
                               "scored earlier")
    if given:
        flags = ", ".join("--" + n.replace("_", "-").replace("store", "output").replace("card-toml", "card")
                          for n in given)
        raise click.UsageError(f"{flags} apply when scoring (MODEL DATA); `estimate STORE` works from "
                               "the scores already in the store and adds the estimates to it")


def _fmt(v: Any) -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _fmt_ci(v: Any, ci: Any) -> str:
    if ci is None or v is None:
        return _fmt(v)
    return f"{_fmt(v)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


# ---------------------------------------------------------------- report
@cli.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.html (or report.md), figures (PNG, SVG) and tables (CSV, JSON).")
@click.option("--format", "fmt", type=click.Choice(["html", "md"]), default="html", show_default=True)
@click.option("--cases", multiple=True, help="Case ids whose maps to draw (default: those saved, up to 4).")
@click.option("--unit-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Count units whose SA is above this.")
@click.option("--estimates", "estimates", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A store written by `protoseg estimate` on the same cases: draw its estimates and validation.")
@click.option("--max-cases", type=click.IntRange(min=0), default=None,
              help="At most this many cases get map figures [default: 4].")
@click.option("--json", "as_json", is_flag=True, help="Print the written paths as JSON.")
@handle_errors
def report(store: Path, out_dir: Path, fmt: str, cases: tuple[str, ...], unit_threshold: float,
           estimates: Path | None, max_cases: int | None, as_json: bool) -> None:
    """Write a self-contained report (HTML or Markdown) of a store.

    \b
    Example:
      protoseg report run.h5 -o report/
      protoseg report run.h5 -o report/ --format md
      protoseg report run.h5 -o report/ --estimates est.h5
    """
    from engine.report import write_report

    path = write_report(store, out_dir, format=fmt, cases=list(cases) or None,
                        unit_threshold=unit_threshold, estimates=estimates, max_cases=max_cases)
    if as_json:
        _echo_json({"report": str(path), "dir": str(out_dir)})
    else:
        click.echo(str(path))


# ---------------------------------------------------------------- export
@cli.group()
def export() -> None:
    """Export a model to ONNX with its hidden layers as named outputs.

    \b
    Sources:
      torch       package.module:function returning an nn.Module (+ --weights state dict),
                  or a TorchScript (.pt) / torch.export (.pt2) file
      tensorflow  a Keras .keras/.h5 file, a SavedModel folder, or a frozen .pb graph
      onnx        an ONNX file from any other framework
    """


def _export_common(func: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                     help="ONNX file to write."),
        click.option("--layers", multiple=True, help="Layers to expose (names, globs, types); default: blocks."),
        click.option("--activation", type=click.Choice(["sigmoid", "softmax", "logits"]),
                     help="What the prediction output ALREADY holds, as the model computes it (not an "
                          "activation to apply): sigmoid = per-channel probabilities in [0, 1], softmax "
                          "= probabilities summing to 1 over channels, logits = raw scores. Default: "
                          "guessed from a final Sigmoid/Softmax. Checked on the export's test run: "
                          "sigmoid/softmax on values outside [0, 1], or softmax on channels not summing "
                          "to 1, is an error and nothing is written."),
        click.option("--scaling", type=click.Choice(["none", "minmax", "zscore", "meanstd"]),
                     help="Intensity scaling the model expects (recorded in the model card)."),
        click.option("--json", "as_json", is_flag=True, help="Print the export result as JSON."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _print_export(result: Any, as_json: bool) -> None:
    d = result.to_dict() if hasattr(result, "to_dict") else dict(vars(result))
    if as_json:
        _echo_json(_clean(d))
        return
    outs = d.get("outputs") or []
    click.echo(f"wrote {d.get('path')} ({len(outs)} outputs)")
    layers = d.get("layers") or d.get("layer_map") or {}
    if isinstance(layers, dict) and layers:
        click.echo(_table([{"output": k, "layer": v} for k, v in layers.items()], ["output", "layer"]))


def _shape(value: str | None, opt: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.lower().replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a shape like 1,1,256,256, got {value!r}", param_hint=opt) from None


@export.command("torch")
@click.argument("source")
@_export_common
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="State-dict file loaded with weights_only=True.")
@click.option("--input-shape", required=True, help="Example input shape, e.g. 1,1,256,256.")
@handle_errors
def export_torch(source: str, out: Path, layers: tuple[str, ...], activation: str | None,
                 scaling: str | None, as_json: bool, weights: Path | None, input_shape: str) -> None:
    """Export a PyTorch model (SOURCE: pkg.module:function, or a .pt/.pt2 file).

    \b
    Example:
      protoseg export torch mypkg.nets:make_unet --weights unet.pth \\
          --input-shape 1,1,256,256 --activation sigmoid -o unet.onnx
    """
    from exporters.torch import export as torch_export
    from exporters.torch import load_torch_model

    import numpy as np

    model = load_torch_model(source, weights=weights)
    shape = _shape(input_shape, "--input-shape")
    import torch

    example = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    kwargs: dict[str, Any] = {"layers": list(layers) or None}
    if activation:
        kwargs["prediction_activation"] = activation
    if scaling:
        kwargs["preprocessing"] = {"scaling": scaling}
    _print_export(torch_export(model, example, out, **kwargs), as_json)


@export.command("tensorflow")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@_export_common
@click.option("--input-shape", help="Input shape for .pb graphs or models without a static shape.")
@handle_errors
def export_tensorflow(source: Path, out: Path, layers: tuple[str, ...], activation: str | None,
                      scaling: str | None, as_json: bool, input_shape: str | None) -> None:
    """Export a TensorFlow/Keras model (SOURCE: .keras, .h5, SavedModel folder or .pb).

    \b
    Example:
      protoseg export tensorflow unet.keras -o unet.onnx --layers 'enc*' --layers 'dec*'
    """
    from exporters.tensorflow import export as tf_export

    kwargs: dict[str, Any] = {"layers": list(layers) or None}
    if activation:
        kwargs["prediction_activation"] = activation
    if scaling:
        kwargs["preprocessing"] = {"scaling": scaling}
    if input_shape:
        kwargs["input_shape"] = _shape(input_shape, "--input-shape")
    _print_export(tf_export(source, out, **kwargs), as_json)


@export.command("onnx")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_export_common
@click.option("--prediction", help="Graph output holding the prediction (default: the only output).")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC", "NCDHW", "NDHWC", "NCW", "NWC"]),
              help="Input layout.")
@handle_errors
def export_onnx(source: Path, out: Path, layers: tuple[str, ...], activation: str | None,
                scaling: str | None, as_json: bool, prediction: str | None, layout: str | None) -> None:
    """Expose the hidden tensors of an ONNX model from any framework, with a model card.

    \b
    Example:
      protoseg export onnx model.onnx -o model-protoseg.onnx --activation softmax
    """
    from exporters.onnx import expose as onnx_expose

    kwargs: dict[str, Any] = {"layers": _split_selectors(layers) if layers else "all"}
    if prediction:
        kwargs["prediction"] = prediction
    if activation:
        kwargs["activation"] = activation
    if layout:
        kwargs["input_layout"] = layout
    if scaling:
        kwargs["preprocessing"] = {"scaling": scaling}
    _print_export(onnx_expose(source, out, **kwargs), as_json)


# ---------------------------------------------------------------- demo
@cli.command()
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("protoseg-demo"), show_default=True, help="Folder for the store and the report.")
@click.option("--level", type=click.Choice(["layer", "unit", "both"]), default="both", show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@handle_errors
def demo(out_dir: Path, level: str, provider: str, quiet: bool, as_json: bool) -> None:
    """Run the main job on real data, offline: deepbrain's 3-D U-Net on Colin27.

    Scores every hidden layer of the shipped deepbrain brain-extraction network
    (MIT) on the Colin27 T1 MRI (BSD-3) once, at layer and unit level, with the
    network's own prediction as guide and reference; compares the prediction with
    the brain mask (Dice); estimates the output quality without ground truth (mean
    SA) from the same scores; and writes one store and the HTML report.

    \b
    Example:
      protoseg demo -o protoseg-demo
    """
    from engine import open_store
    from engine.report import write_report
    from engine.run import estimate_store, score_dataset

    if quiet:
        _setup_logging(0, quiet=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda m: None) if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    say(f"model: {DEMO_MODEL.relative_to(DATA_DIR.parent.parent) if DEMO_MODEL.is_relative_to(DATA_DIR.parent.parent) else DEMO_MODEL}")
    say("data:  Colin27 T1 MRI + brain mask (181x217x181)")
    # a cold Numba cache (first run after installing): the demo's kernels compiled on two
    # cores at once before scoring, instead of one after the other as each is first met
    from engine._kernels.warm import precompile

    if precompile():
        say("compiled the kernels (first run; later runs load them from the cache)")
    update, close = _progress(quiet or as_json, "scoring")
    try:
        # one scoring pass, label-free (guide = reference = the prediction, SPEC §4): the
        # same store gives the layer table, the prediction's Dice against the mask, and the
        # estimates, which are added to it in place
        summary = score_dataset(DEMO_MODEL, DEMO_DATA, out_dir / "demo.h5", level=level,
                                reference="prediction", provider=provider, save_maps=1,
                                overwrite=True, progress=update)
    finally:
        close()
    say(f"scored every hidden layer in {summary.seconds:.1f} s on {summary.provider}")
    estimators = {"layer": ["all-layers"], "unit": ["paper"]}.get(level, ["paper", "all-layers"])
    est = estimate_store(summary.store, estimators=estimators)
    rep = write_report(summary.store, out_dir / "report")
    st = open_store(summary.store)
    rows = layer_summary(st)
    dice = st.output_dice()
    result = {
        "store": str(summary.store),
        "report": str(rep),
        "provider": summary.provider,
        "seconds": round(summary.seconds, 2),
        "output_dice": float(dice[0, 0]),
        "mean_sa": {r: est["ranking"][0].get(r) for r in est["estimators"]},
        "layers": rows,
    }
    if as_json:
        _echo_json(_clean(result))
        return
    if not quiet:
        _print_layer_summary(rows, multi_class=False)
        click.echo("")
        click.echo(f"prediction Dice vs brain mask: {result['output_dice']:.4f}")
        for name, v in result["mean_sa"].items():
            click.echo(f"mean SA ({name}): {_fmt(v)}")
    click.echo(f"store:  {summary.store}")
    click.echo(f"report: {rep}")


# commands defined in their own modules (they import this one: registered after it is complete)
from cli.compare import compare as _compare  # noqa: E402  (issue 18; kept last: cli.compare uses this module)
cli.add_command(_compare)

from cli.merge import merge as _merge  # noqa: E402  (issue 16)
cli.add_command(_merge)

from cli.export_frameworks import monai_cmd, nnunet_cmd  # noqa: E402

export.add_command(nnunet_cmd)
export.add_command(monai_cmd)

from cli.maps import maps as _maps  # noqa: E402  (issue 17)
cli.add_command(_maps)


def main() -> None:
    cli(prog_name="protoseg")


if __name__ == "__main__":  # pragma: no cover
    main()
