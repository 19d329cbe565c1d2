"""Start-up cost of no-code mode: CPU time of `python -c "import torch"` with and without
GRADWATCH=1, interleaved runs in one session (machines are noisy: compare ratios, not seconds).

    python benchmarks/bench_startup.py [--runs 10]

Also times a process that builds an optimizer and steps it once (the session starts there).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys

IMPORT = "import torch"
ONE_STEP = (
    "import torch; m = torch.nn.Linear(4, 2); o = torch.optim.SGD(m.parameters(), lr=0.1);"
    " m(torch.ones(1, 4)).sum().backward(); o.step()"
)


def cpu_seconds(code: str, env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="interleaved runs per case (10)")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH")}
    on = {**base, "GRADWATCH": "1", "GRADWATCH_PORT": "0"}
    for label, code in (("import torch", IMPORT), ("one optimizer step", ONE_STEP)):
        off_t, on_t = [], []
        for _ in range(args.runs):
            off_t.append(cpu_seconds(code, base))
            on_t.append(cpu_seconds(code, on))
        m_off, m_on = statistics.median(off_t), statistics.median(on_t)
        print(
            f"{label:20s} CPU s median of {args.runs}: off {m_off:.3f}  GRADWATCH=1 {m_on:.3f}"
            f"  ratio {m_on / m_off:.3f}"
        )


if __name__ == "__main__":
    main()
