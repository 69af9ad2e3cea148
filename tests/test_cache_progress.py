"""The cache build's progress: a bar on a terminal, plain lines (no carriage returns) in log files."""
import io

from datasets import cache


def square(x: int) -> int:
    return x * x


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_is_plain_lines(capsys):
    """stderr is not a terminal here (pytest captures it), as in a log file or a batch job."""
    assert cache._run_jobs(square, [(i,) for i in range(20)], 1, True, "cache") == [i * i for i in range(20)]
    out, err = capsys.readouterr()
    assert "\r" not in err and "\x1b" not in err and out == ""
    lines = err.splitlines()
    assert lines[0] == "cache: 20 case(s) to do"
    assert lines[1:-1] == [f"cache [{i:>2}/20]" for i in range(2, 21, 2)]  # about every 10 %
    assert lines[-1].startswith("cache: 20 case(s) done in ") and lines[-1].endswith(" s")


def test_progress_in_worker_processes_to_a_stream():
    stream = io.StringIO()
    assert cache._run_jobs(square, [(i,) for i in range(3)], 2, True, "cache", stream=stream) == [0, 1, 4]
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "cache: 3 case(s) to do" and lines[-1].startswith("cache: 3 case(s) done in ")
    assert [line for line in lines if "[" in line] == ["cache [1/3]", "cache [2/3]", "cache [3/3]"]


def test_progress_bar_on_a_terminal_and_silence_without_progress(capsys):
    terminal = Terminal()
    assert cache._run_jobs(square, [(i,) for i in range(4)], 1, True, "cache", stream=terminal) == [0, 1, 4, 9]
    assert "\r" in terminal.getvalue()  # tqdm's bar
    assert terminal.getvalue().splitlines()[-1].startswith("cache: 4 case(s) done in ")
    assert cache._run_jobs(square, [(2,)], 1, False, "cache") == [4]
    assert cache._run_jobs(square, [], 1, True, "cache") == []
    assert capsys.readouterr() == ("", "")
