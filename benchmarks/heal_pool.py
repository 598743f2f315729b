"""Pool several `benchmarks/heal.py` runs: per state and size, the median of every heal against
the median of every warm raw broadcast measured beside them (and of the pairs' first
broadcasts). A single run's medians of 3-9 transfers move a lot on a noisy machine (a 10 MB
broadcast here takes 1.7-10 ms); pooled, the ratio is steadier. One JSON line per case.

    .venv/bin/python benchmarks/heal_pool.py docs/results/heal_run*.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def pool(paths: list[Path]) -> list[dict]:
    cases: dict[tuple[str, float, str], dict[str, list[float]]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            # (runs before the interleaved pairs counted each pair's first broadcast as warm)
            if row.get("case") != "heal" or "raw_broadcast_first_s_all" not in row:
                continue
            key = (row["state"], row["state_mb"], row.get("hosts", "one"))
            case = cases.setdefault(key, {"heal": [], "raw": [], "first": [], "runs": []})
            case["heal"] += row["heal_s_all"]
            case["raw"] += row["raw_broadcast_s_all"]
            case["first"] += row["raw_broadcast_first_s_all"]
            case["runs"].append(row["ratio_to_raw"])
    out = []
    for (state, mb, hosts), c in cases.items():
        heal, raw = statistics.median(c["heal"]), statistics.median(c["raw"])
        line = {
            "case": "heal_pooled",
            "state": state,
            "state_mb": mb,
            "hosts": hosts,
            "runs": len(c["runs"]),
            "heals": len(c["heal"]),
            "raw_broadcasts": len(c["raw"]),
            "heal_s": round(heal, 4),
            "raw_broadcast_s": round(raw, 4),
            # equal bytes (model_adam within 1 %): achieved GB/s ratio = inverse ratio of times
            "ratio_to_raw": round(raw / heal, 3),
            "runs_at_target": sum(r >= 0.8 for r in c["runs"]),
            "target_ratio": 0.8,
        }
        line["ratio_to_raw_first"] = round(statistics.median(c["first"]) / heal, 3)
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+", type=Path, help="JSON lines written by benchmarks/heal.py")
    for line in pool(parser.parse_args().files):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
