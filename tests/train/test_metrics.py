"""The console without a terminal (plain lines, no progress bar) and the loss plot that every run writes."""

from __future__ import annotations

import re
import sys

import pytest

from llamita.pretrain import pretrain
from llamita.train import metrics
from llamita.train.metrics import MetricsLogger

ROW = {"step": 10, "loss": 6.12345, "lr": 2e-4, "grad_norm": 1.234, "tokens": 5120, "tokens_per_s": 4400.0}
LINE = re.compile(r"^step +(\d+) \| loss \d+\.\d{4} \| lr \d\.\d\de-\d\d \| grad norm \d+\.\d\d \| [\d,]+ tok/s$")


@pytest.mark.parametrize("progress", ["true", "false"])
def test_without_a_terminal_training_rows_are_plain_lines(debug_config, tmp_path, capsys, progress):
    """stdout is a pipe here (pytest captures it), as in a Slurm log: no progress bar, a line every log.interval."""
    settings = {"train.max_steps": "12", "log.interval": "5", "eval.interval": "0", "log.progress": progress}
    pretrain(debug_config(tmp_path / "run", **settings))
    out = capsys.readouterr().out
    assert [int(m[1]) for m in map(LINE.match, out.splitlines()) if m] == [5, 10, 12]  # 12: the last step
    assert "━" not in out  # rich's bar


def test_a_terminal_gets_the_progress_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    logger = MetricsLogger(tmp_path, 20, tensorboard=False, progress=True)
    logger.report(ROW)
    logger.close()
    assert not any(LINE.match(line) for line in capsys.readouterr().out.splitlines())


def test_report_line_format(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, 20, tensorboard=False, progress=False)
    logger.report({**ROW, "mfu": 0.352, "skipped_steps": 2})
    logger.close()
    assert capsys.readouterr().out == (
        "step     10 | loss 6.1235 | lr 2.00e-04 | grad norm 1.23 | 4,400 tok/s | MFU 35.2% | 2 skipped steps\n"
    )


def test_every_run_plots_its_loss_at_each_checkpoint(debug_config, tmp_path, monkeypatch):
    plotted = []

    def plot_loss(metrics_path, out_png):
        plotted.append(max(r["step"] for r in metrics.read_metrics(metrics_path)))
        return real(metrics_path, out_png)

    real = metrics.plot_loss
    monkeypatch.setattr(metrics, "plot_loss", plot_loss)
    run = tmp_path / "run"
    pretrain(debug_config(run, **{"train.max_steps": "6", "checkpoint.interval": "4", "eval.interval": "0"}))
    assert plotted == [4, 6]  # each save, and the end (which always saves)
    assert (run / "loss.png").stat().st_size > 1000


def test_a_failing_plot_is_a_warning(debug_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"could not write the loss plot .*loss\.png: ModuleNotFoundError"):
        result = pretrain(debug_config(run, **{"train.max_steps": "2", "eval.interval": "0"}))
    assert result["step"] == 2 and not (run / "loss.png").exists()
