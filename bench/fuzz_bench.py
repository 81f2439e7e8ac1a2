"""Schemathesis against a live Keyway, at depth: every operation of /v1/openapi.json, the billing API and the
management API, `--cases` generated requests each (half valid, half not), with the checks of
tests/e2e/test_fuzz.py (no 5xx, bodies and headers as documented, every error an OpenAI error object).

Starts the fake upstream and Keyway (uvicorn, one worker) on a scratch database, as the end-to-end tests do
(DATABASE_URL / REDIS_URL give a scratch PostgreSQL database and Redis prefix), and prints one line per
operation: cases run (valid + invalid), cases that failed a check, and the statuses answered; then each
distinct failure once, with a curl to repeat it. An operation whose requests are few in all (GET /models has
one) stops when Hypothesis has sent every one. Exits 1 if any check failed.

    .venv/bin/python bench/fuzz_bench.py [--cases 1000] [--only responses] [--seed N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))

from tests.e2e import fuzzing  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000, help="Requests per operation (default 1000).")
    parser.add_argument("--only", default="", help="Only operations whose label contains this text.")
    parser.add_argument("--seed", type=int, default=fuzzing.SEED)
    options = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keyway-fuzz-") as var_dir:
        with fuzzing.fuzz_stack(Path(var_dir), cases=options.cases) as stack:
            targets = fuzzing.targets(stack["url"], stack["keys"], stack["env"])
            pool = fuzzing.seed_pool(stack["url"], stack["keys"])
            print(
                f"Fuzzing {sum(len(t.document['paths']) for t in targets)} paths, {options.cases} cases per "
                f"operation, seed {options.seed}",
                flush=True,
            )
            outcomes = fuzzing.fuzz(
                targets,
                cases=options.cases,
                pool=pool,
                log=lambda line: print(line, flush=True),
                only=lambda label: options.only in label,
                seed_value=options.seed,
            )
            errors = [line for line in stack["log"].read_text(errors="replace").splitlines() if "Traceback" in line]
    total = sum(outcome.total for outcome in outcomes)
    failed = sum(outcome.failed_cases for outcome in outcomes)
    print(
        f"\n{len(outcomes)} operations, {total} cases, {failed} failed, {time.monotonic() - started:.0f} s; "
        f"{len(errors)} tracebacks in the server log"
    )
    found = fuzzing.report(outcomes)
    if found:
        print("\nFailures (the first example of each):\n" + found)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
