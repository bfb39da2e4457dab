"""A longer fuzz of the control plane's OpenAPI schema than CI runs: no input may give a 500.

    python3 bench/fuzz_api.py [--examples 200] [--seed N]

Runs ``tests/interfaces/test_http_fuzz.py`` (schemathesis against the app in-process, operator token on every
request) with ``--examples`` examples per operation; with ``--seed`` the examples are random instead of the fixed
set CI uses. Prints the elapsed time and pytest's summary; exits non-zero when any input got a 5xx.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per operation (CI uses 6)")
    parser.add_argument("--seed", type=int, default=None, help="random examples from this seed")
    args = parser.parse_args()
    env = {**os.environ, "STITCHWORK_FUZZ_EXAMPLES": str(args.examples),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/interfaces/"
               "test_http_fuzz.py")]
    if args.seed is not None:
        env["STITCHWORK_FUZZ_SEED"] = str(args.seed)
        command.append(f"--hypothesis-seed={args.seed}")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, check=False)
    print(f"fuzz: {args.examples} examples per operation, {time.perf_counter() - started:.1f} s, "
          f"{'no 5xx' if result.returncode == 0 else 'FAILED (see above)'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
