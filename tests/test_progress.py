"""staralign.progress: plain lines without a terminal (each tenth, every 30 s), bars with one."""

from __future__ import annotations

import io

import pytest

from staralign.progress import Progress, format_duration, mode_for


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines_progress(total, clock, **kw):
    out = io.StringIO()
    return Progress(total, "epoch 1/8", "step", stream=out, mode="lines", clock=clock, heartbeat=False, **kw), out


def test_plain_lines_at_each_tenth_with_rate_elapsed_remaining_and_loss():
    clock = FakeClock()
    bar, out = lines_progress(100, clock)
    for _ in range(100):
        clock.t += 0.5
        bar.set_postfix(loss="1.2345")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # one per tenth; the last one is the final count, not repeated at close
    assert lines[0] == "epoch 1/8: 10/100 steps (10%), 2 steps/s, 0:05 elapsed, 0:45 left, loss 1.2345"
    assert lines[-1].startswith("epoch 1/8: 100/100 steps (100%), 2 steps/s, 0:50 elapsed, loss 1.2345")


def test_a_line_at_least_every_interval_even_between_tenths():
    clock = FakeClock()
    bar, out = lines_progress(1000, clock)
    for _ in range(40):  # 40 slow steps: 4% of the total, no tenth crossed
        clock.t += 10
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 13  # 400 s at one line per 30 s
    assert "12 steps/s" not in out.getvalue() and "10 s/step" in out.getvalue()


def test_heartbeat_tick_speaks_while_one_step_runs_long():
    clock = FakeClock()
    bar, out = lines_progress(10, clock)
    clock.t += 29
    bar.tick()
    assert out.getvalue() == ""
    clock.t += 2
    bar.tick()
    assert out.getvalue() == "epoch 1/8: 0/10 steps (0%), 0:31 elapsed\n"
    bar.close()
    bar.tick()  # closed: silent
    assert len(out.getvalue().splitlines()) == 1


def test_heartbeat_thread_writes_on_its_own():
    out = io.StringIO()
    bar = Progress(5, "synth", "face", stream=out, mode="lines", interval=0.05)
    import time

    time.sleep(0.3)
    bar.close()
    assert "synth: 0/5 faces" in out.getvalue()


def test_resumed_count_and_unknown_total():
    clock = FakeClock()
    bar, out = lines_progress(10, clock, initial=5)
    clock.t += 4
    bar.update(1)
    assert out.getvalue().startswith("epoch 1/8: 6/10 steps (60%), 4 s/step, 0:04 elapsed, 0:16 left")
    bar, out = lines_progress(None, clock, interval=1)
    clock.t += 2
    bar.update(3)
    assert out.getvalue() == "epoch 1/8: 3 steps, 1.5 steps/s, 0:02 elapsed\n"


def test_disabled_writes_nothing():
    out = io.StringIO()
    bar = Progress(3, "x", stream=out, enabled=False)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""


def test_mode_follows_the_stream_and_the_environment(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("STARALIGN_PROGRESS", raising=False)
    assert mode_for(io.StringIO()) == "lines"
    assert mode_for(Tty()) == "bar"
    for value, mode in (("lines", "lines"), ("off", "off"), ("0", "off"), ("1", "bar"), ("bar", "bar")):
        monkeypatch.setenv("STARALIGN_PROGRESS", value)
        assert mode_for(Tty()) == mode


def test_bar_on_a_terminal():
    out = io.StringIO()
    with Progress(4, "evaluating", "face", stream=out, mode="bar") as bar:
        bar.update(4)
    assert "evaluating:" in out.getvalue() and "/4 [" in out.getvalue()  # a tqdm bar, not a line


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00"), (61.4, "1:01"), (3725, "1:02:05")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


# --------------------------------------------------------------------------- the call sites, without a terminal


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.delenv("STARALIGN_PROGRESS", raising=False)  # stderr is captured: not a terminal


def test_data_synth_reports_in_plain_lines(tmp_path, capsys, no_terminal):
    from staralign.data.synth import generate_dataset

    generate_dataset(tmp_path, train=6, test=4, size=64, progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("synth: ")]
    assert lines and lines[-1].startswith("synth: 10/10 faces (100%)") and "elapsed" in lines[-1]
    assert "\r" not in "".join(lines)


def test_data_convert_reports_in_plain_lines(tmp_path, capsys, no_terminal):
    from staralign.data.converters import read_wflw_list

    row = " ".join(["10"] * 196 + ["0", "0", "50", "50"] + ["0"] * 6 + ["img.jpg"])
    path = tmp_path / "list.txt"
    path.write_text("\n".join([row] * 20) + "\n")
    assert len(read_wflw_list(path)) == 20
    err = capsys.readouterr().err
    assert "convert list.txt: 20/20 lines (100%)" in err and len(err.splitlines()) == 10


def test_predict_reports_each_input(tmp_path, capsys, no_terminal):
    import cv2
    import numpy as np

    from staralign.cli import main
    from staralign.data.synth import render_face
    from staralign.models import save_model

    from .test_eval import tiny_model

    weights = save_model(tiny_model(), tmp_path / "m.safetensors")
    for k in range(3):
        cv2.imwrite(str(tmp_path / f"face{k}.png"), render_face(np.random.default_rng(k), 96)[0])
    assert main(["predict", *(str(tmp_path / f"face{k}.png") for k in range(3)), "--weights", str(weights),
                 "--box", "8,8,88,88", "--device", "cpu"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("predict: ")]
    assert [ln.split(",")[0] for ln in lines[:3]] == ["predict: 1/3 images (33%)", "predict: 2/3 images (67%)",
                                                       "predict: 3/3 images (100%)"]
    assert "last face2.png" in lines[2]


def test_training_reports_steps_loss_and_time_in_a_log(tmp_path, capsys, no_terminal):
    from staralign.data.synth import generate_dataset
    from staralign.engine.trainer import train

    from .test_engine import tiny_config

    generate_dataset(tmp_path / "data", train=16, test=4, size=64)
    capsys.readouterr()
    train(tiny_config(tmp_path / "data", optim={"epochs": 1}, runtime={"tensorboard": False}), tmp_path / "run")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epoch 1/1: ") and "steps" in ln]
    assert lines[-1].startswith("epoch 1/1: 4/4 steps (100%)") and "loss " in lines[-1]
    assert any(" left" in ln for ln in lines) and all("elapsed" in ln for ln in lines)


def test_an_unclosed_progress_stops_its_heartbeat_when_dropped():
    import gc

    out = io.StringIO()
    bar = Progress(5, "x", stream=out, mode="lines", interval=0.05)
    thread = bar._thread
    del bar
    gc.collect()
    thread.join(1.0)
    assert not thread.is_alive()
