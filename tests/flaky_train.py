"""train.py with a worker that dies once: ``python tests/flaky_train.py ITERATION train.py-arguments...``.

Under torchrun, rank 1 exits abruptly (``os._exit(1)``, as a killed process) when it starts step
``ITERATION`` (0-based) of the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0); restarted attempts run
normally. Used by tests/test_multinode.py to test ``--max-restarts`` with ``--resume auto``.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from core.distributed import exit_process  # noqa: E402
from core.errors import run_cli  # noqa: E402


def main() -> None:
    die_at, argv = int(sys.argv[1]), sys.argv[2:]
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and os.environ.get("RANK") == "1":
        real_build, steps = train.build_loss, []

        def build_loss(cfg, task):
            loss = real_build(cfg, task)
            original = loss.forward

            def forward(prediction, target):
                if len(steps) == die_at:
                    os._exit(1)
                steps.append(1)
                return original(prediction, target)
            loss.forward = forward
            return loss
        train.build_loss = build_loss
    run_cli(train.main, argv, exit_with=exit_process)


if __name__ == "__main__":
    main()
