"""How fast the orchestrator answers when there is nothing to do.

Target (issue 2): `llmpipe plan` and a fully cached run return in at most 2 s wall, because
torch, deepspeed, vllm and mlflow are imported only where they are used.

Measured here, same machine, same run, best of N:
- `llmpipe plan` on the real project (tiny and llama-7b configs);
- a fully cached `llmpipe run` of an eleven-stage chain (bench/chain_project.py: the real stage
  names, trivial work), MLflow tracking on; and of the real tiny pipeline when runs/ holds one;
- baselines: `python -c pass` (interpreter floor) and `python -c "import mlflow"` and
  `python -c "import torch"` (what a naive orchestrator would pay on every call).

Run: `make bench` (or .venv/bin/python bench/orchestrator.py [--repeat N]).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 2.0


def wall(cmd: list[str], cwd: Path, repeat: int) -> float:
    from pipeline.processes import child_env

    env = child_env(pythonpath=[REPO])  # the chain project and this checkout's code, whatever the cwd
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        best = min(best, elapsed)
    return best


def chain_cli(conf_dir: Path, *args: str) -> list[str]:
    code = ("import sys; from pipeline.cli import main; "
            "sys.exit(main(sys.argv[1:], project_path='bench.chain_project:PROJECT', "
            f"default_config_dir={str(conf_dir)!r}))")
    return [sys.executable, "-c", code, *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    llmpipe = str(Path(sys.executable).parent / "llmpipe")
    rows: list[tuple[str, float]] = []

    rows.append(("baseline: python -c pass", wall([sys.executable, "-c", "pass"], REPO, args.repeat)))
    rows.append(("baseline: python -c 'import mlflow'", wall([sys.executable, "-c", "import mlflow"], REPO, 1)))
    rows.append(("baseline: python -c 'import torch'", wall([sys.executable, "-c", "import torch"], REPO, 1)))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows.append(("llmpipe plan (tiny)", wall([llmpipe, "plan", "-c", "tiny", f"run.root={root / 'real'}"],
                                                 REPO, args.repeat)))
        # plan checks that the inputs exist: the recipe's crawl (/data/crawl) is pointed at the embedded one
        rows.append(("llmpipe plan (llama-7b)", wall([llmpipe, "plan", "-c", "llama-7b", f"run.root={root / 'real'}",
                                                      "data.warc=data/embedded/*.warc.gz"], REPO, args.repeat)))

        from bench.chain_project import YAML

        conf = root / "conf"
        conf.mkdir()
        (conf / "chain.yaml").write_text(YAML)
        first = wall(chain_cli(conf, "run", "-c", "chain", "--wait-tracking"), root, 1)
        rows.append(("chain: first run, 11 stages (each a process)", first))
        rows.append(("chain: fully cached run, tracking on", wall(chain_cli(conf, "run", "-c", "chain"),
                                                                  root, args.repeat)))

    real_runs = REPO / "runs"
    if (real_runs / "evaluate").is_dir():
        rows.append(("llmpipe run (tiny, fully cached)", wall([llmpipe, "run", "-c", "tiny"], REPO, args.repeat)))
    else:
        print("(no complete tiny run under runs/: the real fully cached run is not measured)")

    floor = rows[0][1]
    print(f"\n{'measurement':<48} {'wall s':>8} {'x python':>9} {'budget':>8}")
    for name, seconds in rows:
        verdict = "" if name.startswith("baseline") or "first run" in name else (
            "ok" if seconds <= BUDGET_S else "OVER")
        print(f"{name:<48} {seconds:>8.2f} {seconds / floor:>9.1f} {verdict:>8}")
    print(f"\nbudget: {BUDGET_S:.1f} s wall for plan and a fully cached run")
    over = [n for n, s in rows if not n.startswith("baseline") and "first run" not in n and s > BUDGET_S]
    return 1 if over else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
