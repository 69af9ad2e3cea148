"""Run a script's ``main`` in this process as its command line would: ``run_cli`` turns user errors
into one line and an exit code, which is returned with everything printed."""
import contextlib
import io

from core.errors import run_cli


def run_cli_captured(main, argv) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``run_cli(main, argv)`` (argv items as strings)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(main, [str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()
