"""Rewrite the README's bundled-models table from a ``trdq eval --out FILE.json`` report.

    trdq eval --out eval.json                       # every bundled model, seed 0, 30 per class
    python scripts/bundled_table.py eval.json       # README.md, between <!-- bundled:begin/end -->

The "what" column is kept as it stands in the README; the quality column is rebuilt from the
report: class match and digits-FID with their 95% bootstrap intervals for the generators,
held-out accuracy (with its interval) for the classifiers. A model in the table but not in the
report keeps its row unchanged; a model in the report but not in the table is refused (it has
no description to keep).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

BEGIN, END = "<!-- bundled:begin -->", "<!-- bundled:end -->"
HEADER = ["| model | what | quality (`trdq eval`, seed 0, 95% bootstrap intervals) |",
          "|---|---|---|"]
ROW = re.compile(r"^\| `(?P<name>[^`]+)` \| (?P<what>.*) \| (?P<quality>.*) \|$")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _interval(pair, fmt) -> str:
    return f"[{fmt(pair[0])}, {fmt(pair[1])}]"


def quality(result: dict) -> str:
    """The quality cell of one ``trdq eval`` result."""
    if "heldout" in result:  # a classifier
        acc, ci = result["heldout"], result.get("heldout_ci95", {})
        if "frame_accuracy" in acc:
            return (f"held-out frame accuracy {_pct(acc['frame_accuracy'])} "
                    f"{_interval(ci['frame_accuracy'], _pct)} ({_pct(acc['video_accuracy'])} "
                    "of videos all frames right)")
        return f"held-out accuracy {_pct(acc['accuracy'])} {_interval(ci['accuracy'], _pct)}"
    match, ci = result["class_match"], result["class_match_ci95"]
    fid = (f"digits-FID {result['digits_fid']:.2f} "
           f"{_interval(result['digits_fid_ci95'], lambda v: f'{v:.2f}')}")
    n = result["num_samples"]
    setting = f"{result['sampler'].replace('ddim', 'DDIM').replace(' steps', '')}, " \
              f"CFG {result['cfg_scale']:g}"
    if "frame_accuracy" in match:
        return (f"per-frame class match {_pct(match['frame_accuracy'])} "
                f"{_interval(ci['frame_accuracy'], _pct)} ({_pct(match['video_accuracy'])} "
                f"{_interval(ci['video_accuracy'], _pct)} of videos all frames right), {fid} "
                f"({n} videos, {setting})")
    what = ("prompt match (digits asked in held-out phrasings)"
            if "asked in words" in result.get("label_layout", "") else "class match")
    return (f"{what} {_pct(match['accuracy'])} {_interval(ci['accuracy'], _pct)}, {fid} "
            f"({n} samples, {setting})")


def rewrite(readme: str, results: list[dict]) -> str:
    """``readme`` with the table between the markers rebuilt from ``results``."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"README: expected one {BEGIN} and one {END}")
    head, rest = readme.split(BEGIN)
    table, tail = rest.split(END)
    by_name = {r["model"]: r for r in results}
    rows, seen = [], set()
    for line in table.strip().splitlines():
        m = ROW.match(line)
        if not m or m["name"] == "model":
            continue
        name = m["name"]
        seen.add(name)
        cell = quality(by_name[name]) if name in by_name else m["quality"]
        rows.append(f"| `{name}` | {m['what']} | {cell} |")
    unknown = sorted(set(by_name) - seen)
    if unknown:
        raise ValueError(f"report: {unknown} have no row in the README table (add one with its "
                         "description first)")
    return head + BEGIN + "\n" + "\n".join(HEADER + rows) + "\n" + END + tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="JSON written by trdq eval --out")
    parser.add_argument("--readme", default=str(pathlib.Path(__file__).parents[1] / "README.md"),
                        help="README to rewrite in place (default: the repository's)")
    args = parser.parse_args(argv)
    data = json.loads(pathlib.Path(args.report).read_text())
    results = data["results"] if isinstance(data, dict) else data
    path = pathlib.Path(args.readme)
    text = rewrite(path.read_text(), results)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"rewrote the bundled-models table of {path} from {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
