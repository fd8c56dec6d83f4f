"""Draw a training run's curves from its log.jsonl: loss terms and lr per epoch, COCO AP/AP50 (or, for Pascal VOC,
the VOC mAP at IoU 0.5) per evaluated epoch.

    python plot_curves.py OUTPUT_DIR/log.jsonl -o curves.png
    python plot_curves.py runA/log.jsonl runB/log.jsonl -o compare.png    # several runs on one figure

train.py calls plot_curves() after every epoch, so the picture of a running job is always current.
"""
import argparse
import json
import os
import sys

# The object-oriented Figure API renders with Agg without touching pyplot's global state: no display is needed
# and a training process that imports this module keeps whatever backend it had.
from matplotlib.figure import Figure

import cli
import safe_io

REQUIRED_KEYS = {"epoch", "lr", "train"}
# Accuracy panel per evaluation kind: (log key, {metric: legend label}, title); the first kind the log holds is drawn.
ACCURACY_PANELS = (
    ("voc", {"mAP_11pt": "mAP (VOC2007 11-point)", "mAP_area": "mAP (VOC2010+ area)"}, "Pascal VOC mAP@0.5 (val)"),
    ("coco", {"AP": "AP", "AP50": "AP50"}, "COCO bbox AP (val)"),
)


def read_log(log_path):
    """One record per epoch, in epoch order.

    A line that is not valid JSON (the tail torn by a crash mid-write) is skipped with a warning. When an epoch
    appears twice (a run resumed from an older checkpoint), the later record wins.
    """
    records = {}
    try:
        lines = _read_lines(log_path)
    except UnicodeDecodeError:
        raise ValueError(f"{log_path}: not a text file, so not a log.jsonl written by train.py") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"{log_path}:{line_number}: skipping a line that is not complete JSON", file=sys.stderr)
            continue
        if not isinstance(record, dict) or not REQUIRED_KEYS <= record.keys():
            needed = ", ".join(sorted(REQUIRED_KEYS))
            raise ValueError(f"{log_path}:{line_number}: not an epoch record (needs {needed})")
        records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


def _read_lines(log_path):
    with open(log_path, encoding="utf-8") as f:
        return f.readlines()


def plot_curves(log_path, output_path):
    """Write a PNG with three panels (training losses, learning rate, COCO AP or VOC mAP) drawn from log_path."""
    records = _records_to_plot(log_path)
    epochs = [r["epoch"] for r in records]
    figure, (loss_axes, lr_axes, ap_axes) = _three_panels()

    for term in records[-1]["train"]:
        loss_axes.plot(epochs, [r["train"].get(term, float("nan")) for r in records], marker="o", label=term)
    loss_axes.set(title="training loss", xlabel="epoch")
    loss_axes.legend()

    lr_axes.plot(epochs, [r["lr"] for r in records], marker="o")
    lr_axes.set(title="learning rate", xlabel="epoch")

    key, metrics, title = next((panel for panel in ACCURACY_PANELS if any(panel[0] in r for r in records)),
                               ACCURACY_PANELS[-1])
    evaluated = [r for r in records if key in r]
    for metric, label in metrics.items():
        ap_axes.plot([r["epoch"] for r in evaluated], [r[key][metric] for r in evaluated], marker="o", label=label)
    ap_axes.set(title=title, xlabel="epoch", ylim=(0, 1))
    if evaluated:
        ap_axes.legend()
    else:
        ap_axes.text(0.5, 0.5, "no evaluated epoch yet", ha="center", va="center", transform=ap_axes.transAxes)

    _save(figure, output_path)


def _records_to_plot(log_path):
    records = read_log(log_path)
    if not records:
        raise ValueError(f"{log_path}: no complete epoch record to plot")
    return records


def _three_panels():
    """A figure and its loss, learning-rate and AP axes, side by side over a shared epoch axis."""
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    return figure, figure.subplots(1, 3, sharex=True)


def _save(figure, output_path):
    for axes in figure.axes:
        axes.grid(alpha=0.3)
        # Epochs are whole numbers; without this a 2-epoch run gets ticks at 0.25, 0.5, ...
        axes.xaxis.get_major_locator().set_params(integer=True)
    # Rename into place so that someone watching the file never opens a half-written picture.
    with safe_io.replacing(output_path) as temporary_path:
        figure.savefig(temporary_path, format="png", dpi=100)


def run_labels(log_paths):
    """A label per log: its folder's name, with as many parent folders as it takes to tell the runs apart."""
    parts = [os.path.abspath(path).split(os.sep)[:-1] for path in log_paths]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = [os.sep.join(p[-depth:]) or os.sep for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.path.abspath(path) for path in log_paths]  # the same log twice


def plot_comparison(log_paths, output_path):
    """Write a PNG with several runs on one figure: total training loss, learning rate and COCO AP (solid) / AP50
    (dashed), one colour per run, labelled by its folder."""
    runs = [(label, _records_to_plot(path)) for path, label in zip(log_paths, run_labels(log_paths))]
    figure, (loss_axes, lr_axes, ap_axes) = _three_panels()
    for index, (label, records) in enumerate(runs):
        colour = f"C{index % 10}"
        epochs = [r["epoch"] for r in records]
        loss_axes.plot(epochs, [r["train"].get("loss", float("nan")) for r in records], marker="o", color=colour,
                       label=label)
        lr_axes.plot(epochs, [r["lr"] for r in records], marker="o", color=colour)
        evaluated = [r for r in records if "coco" in r]
        for metric, style in (("AP", "-"), ("AP50", "--")):
            ap_axes.plot([r["epoch"] for r in evaluated], [r["coco"][metric] for r in evaluated], style, marker="o",
                         color=colour, label=label if metric == "AP" else None)
    loss_axes.set(title="training loss (total)", xlabel="epoch")
    lr_axes.set(title="learning rate", xlabel="epoch")
    ap_axes.set(title="COCO bbox AP (solid) and AP50 (dashed), val", xlabel="epoch", ylim=(0, 1))
    loss_axes.legend(fontsize="small")
    ap_axes.legend(fontsize="small")
    _save(figure, output_path)


def get_args_parser():
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", metavar="log",
                        help="a log.jsonl written by train.py; several logs are compared on one figure")
    parser.add_argument("-o", "--output", default=None,
                        help="PNG to write (default: curves.png next to a single log, compare.png for several); an "
                             "existing file is replaced only if it is a matplotlib PNG (see --overwrite), never a "
                             "log or another file of a training run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output that is not a matplotlib PNG")
    return parser


def is_matplotlib_png(path):
    """Whether path is a PNG that matplotlib wrote (its Software text chunk comes before the pixels): what
    plot_curves.py and train.py write, so replacing it loses nothing of the user's."""
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in head


def main(args):
    single = len(args.logs) == 1
    default = os.path.join(os.path.dirname(os.path.abspath(args.logs[0])), "curves.png") if single else "compare.png"
    output = args.output or default
    safe_io.check_output_file(output, "--output", inputs=[("log", log) for log in args.logs],
                              kind="a matplotlib PNG", is_kind=is_matplotlib_png, overwrite=args.overwrite)
    if single:
        plot_curves(args.logs[0], output)
    else:
        plot_comparison(args.logs, output)
    print(f"wrote {output}")


if __name__ == "__main__":
    cli.survive_closed_output()
    try:
        main(get_args_parser().parse_args())
    except (OSError, ValueError) as error:  # cli.UserInputError is a ValueError
        sys.exit(f"plot_curves.py: {cli.one_line(error)}")
