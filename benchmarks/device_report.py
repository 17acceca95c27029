"""Appends the JSON results of one `benchmarks/device.sh` run to
benchmarks/RESULTS.md, as one section headed by the machine that ran it.

    python benchmarks/device_report.py OUT_DIR benchmarks/RESULTS.md

Only what the run measured is written: a benchmark that failed or ran out
of time is listed with its exit status and no numbers.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sys


def table(rows: list[dict], columns: list[str]) -> list[str]:
  def cell(value):
    if isinstance(value, float):
      return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |"
            for r in rows]
  return lines


def load(out: pathlib.Path, name: str) -> dict | None:
  path = out / f"{name}.json"
  return json.loads(path.read_text()) if path.exists() else None


def section(out: pathlib.Path) -> list[str]:
  machine = (out / "machine.txt").read_text().strip().splitlines()
  status = ((out / "status.txt").read_text().strip().splitlines()
            if (out / "status.txt").exists() else [])
  lines = [f"## benchmarks/device.sh, {datetime.date.today()}", "",
           "Machine (`machine.txt` of the run):", "", "```", *machine, "```",
           "", "Exit status and seconds of each benchmark: " +
           "; ".join(status), ""]
  train = load(out, "train_step")
  if train:
    lines += [f"### train_step.py: {train['model']}, {train['device']}, "
              f"jax {train['jax']}", ""]
    lines += table(train["results"], ["dtype", "per_device_batch",
                                      "images_per_s", "step_ms",
                                      "first_step_incl_compile_s"]) + [""]
  evaluate = load(out, "evaluate")
  if evaluate:
    lines += [f"### evaluate.py: evaluation against the bare forward, "
              f"{evaluate['device']}", ""]
    lines += table(evaluate["rows"], ["batch_size", "bare_images_per_s",
                                      "evaluation_images_per_s", "ratio",
                                      "from_memory_images_per_s",
                                      "from_memory_ratio"])
    lines += ["", f"Best evaluation / best bare forward: "
              f"**{evaluate['ratio_of_bests']:.3f}** (goal >= 0.95); from "
              f"memory {evaluate['from_memory_ratio_of_bests']:.3f}", ""]
  loop = load(out, "loop")
  if loop:
    rows = [{"bare img/s": r["bare"]["images_per_s"],
             "loop img/s": r["loop"]["images_per_s"],
             "loop, windows after a save": r["loop"]["windows_after_a_save"],
             "ratio": r["ratio"],
             "loop without saves img/s":
                 r["loop_without_saves"]["images_per_s"],
             "ratio without saves": r["ratio_without_saves"],
             "fed img/s": r["bare"]["fed_images_per_s"],
             "without saves / fed": r["ratio_without_saves_to_fed"],
             "median windows, without saves / bare":
                 r["median_window_ratio_without_saves"],
             "compile": json.dumps(r["loop"]["compile"])}
            for r in loop["runs"]]
    lines += [f"### loop.py: the loop against the bare step, "
              f"{loop['device']}, args {json.dumps(loop['args'])}", ""]
    lines += table(rows, list(rows[0])) + [
        "", f"Median loop / bare: **{loop['ratio']:.3f}** (goal >= 0.95); "
        f"without saves {loop['ratio_without_saves']:.3f}; median windows "
        f"without saves / bare "
        f"{loop['median_window_ratio_without_saves']:.3f}",
        ""]
  data = load(out, "data")
  if data:
    lines += ["### data.py: prepare and the input pipeline", ""]
    lines += table([data], list(data)) + [""]
  cost = load(out, "step_cost")
  if cost:
    rows = [{"model": r["model"], "dtype": r["dtype"], "step": r["step"],
             "GFLOP/img": r["ours"]["gflop_per_image"],
             "MB/img": r["ours"]["mb_per_image"],
             "compile s": r["ours"]["compile_s"]}
            for r in cost["results"]]
    lines += [f"### step_cost.py: XLA's cost analysis of the compiled steps, "
              f"batch {cost['batch']} at {cost['size']} px, {cost['device']}",
              ""]
    lines += table(rows, list(rows[0])) + [""] if rows else []
  return lines


def main():
  out, results = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
  text = results.read_text().rstrip("\n")
  results.write_text(text + "\n\n" + "\n".join(section(out)) + "\n")
  print("\n".join(section(out)))


if __name__ == "__main__":
  main()
