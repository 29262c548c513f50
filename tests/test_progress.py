"""Progress lines for logs: rate and ETA formatting, evaluate_editor's lines every ~10% of records, and
training's lines every N steps and through a (long) validation."""

from __future__ import annotations

import logging
import re

import pytorch_lightning as pl
import torch

from metaedit.callbacks import ProgressLog
from metaedit.evaluation import evaluate_editor
from metaedit.metrics import score_rows
from metaedit.progress import Progress, format_duration
from metaedit.system import EditorSystem


def test_durations_and_lines_are_formatted():
    assert [format_duration(s) for s in (7.44, 42.4, 2592, 3725)] == ["7.4s", "42s", "43m12s", "1h02m"]
    p = Progress(200, unit="rec", noun="records")
    p.t0 -= 10.0  # 10 s ago
    assert re.fullmatch(r"40/200 records \(20\.0%\) 4\.00 rec/s ETA 40s", p.line(40))
    assert p.line(200).startswith("200/200 records (100.0%) 20.00 rec/s in 10")
    resumed = Progress(1200, start=100)
    resumed.t0 -= 100.0
    assert resumed.line(125) == "125/1200 (10.4%) 0.25 it/s ETA 1h11m"  # rate of this run's 25 steps only
    slow = Progress(100, unit="step", noun="sequential steps of 10")
    slow.t0 -= 700.0
    assert slow.line(10) == "10/100 sequential steps of 10 (10.0%) 70.0 s/step ETA 1h45m"

    # due(): one line per tenth crossed (a chunk finishing several units at once gives one), and the end.
    ticks = Progress(100)
    assert [d for d in (5, 10, 12, 35, 36, 99, 100, 100) if ticks.due(d)] == [10, 35, 99, 100]
    assert [d for d in (1, 2, 3) if Progress(3).due(d)] == [1, 2, 3]
    assert not Progress(None).due(5)


def test_scoring_a_large_group_logs_progress(make_editor, make_data, caplog):
    """A group of many edits is scored in row chunks for minutes: the chunks say where it is."""
    editor = make_editor("ft", steps=0)
    batch = next(iter(make_data(editor.formatter, eval_n_edits=1).loader("test", limit=20, shuffle=False,
                                                                         batch_size=20)))
    edited = editor.edit(batch.requests)
    with caplog.at_level(logging.INFO, logger="metaedit.metrics"):
        quiet = score_rows(editor, edited, [batch.edit, batch.inscope], None, max_rows=8)
        assert not caplog.records  # below report_rows
        loud = score_rows(editor, edited, [batch.edit, batch.inscope], None, max_rows=8, report_rows=1)
    lines = [r.getMessage() for r in caplog.records]
    n_rows = len(batch.edit) + len(batch.inscope)
    assert len(lines) >= 3 and lines[-1].startswith(f"scoring: {n_rows}/{n_rows} rows scored (100.0%)")
    assert all(torch.equal(a[k], b[k]) for a, b in zip(quiet, loud) for k in a)


def test_evaluation_logs_progress_with_counts_and_eta(make_editor, make_data, caplog):
    editor = make_editor("ft", steps=0)
    data = make_data(editor.formatter, eval_n_edits=1)
    with caplog.at_level(logging.INFO, logger="metaedit.evaluation"):
        report = evaluate_editor(editor, data, split="test", limit=20)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate: ")]
    assert report["metrics"]["n_edits"] == 20
    assert len(lines) == 10  # every 2 records (10%), the last one included
    assert re.match(r"evaluate: 2/20 records \(10\.0%\) [\d.]+ rec/s ETA \S+ edit_acc so far [\d.]+$", lines[0])
    assert re.match(r"evaluate: 20/20 records \(100\.0%\) [\d.]+ rec/s in \S+ edit_acc so far [\d.]+$", lines[-1])


def test_training_callback_logs_steps_and_validation_quarters(make_editor, make_data, caplog):
    ed = make_editor("mend", "tiny-gpt2")
    # long_validation_s=0: every validation counts as long, so its quarter lines appear too.
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, limit_val_batches=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, inference_mode=False,
                         callbacks=[ProgressLog(every_n_steps=1, long_validation_s=0)])
    with caplog.at_level(logging.INFO, logger="metaedit.callbacks"):
        trainer.fit(EditorSystem(ed), datamodule=make_data(ed.formatter, n_edits=2))
    # Only the callback's own lines (Lightning's INFO lines reach caplog too, depending on test order).
    lines = [r.getMessage() for r in caplog.records if r.name == "metaedit.callbacks"]
    # MEND's summaries of its learned step sizes (Editor.state_to_log) follow the losses.
    state = r"( state/edit_lr_(max|mean|min) \S+){3}"
    assert re.match(r"step 1/2 \(50\.0%\) [\d.]+ it/s ETA \S+ train/loss [\d.]+" + state + "$", lines[0]), lines
    assert [m.split(" ")[4] for m in lines if re.match(r"validation at step 2: ", m)] == ["1/4", "2/4", "3/4"]
    assert re.match(r"validation at step 2 \(\S+\): .*val/loss [\d.]+", lines[-1]), lines
    assert re.match(r"step 2/2 \(100\.0%\) [\d.]+ it/s in \S+ train/loss [\d.]+" + state + "$", lines[1]), lines
