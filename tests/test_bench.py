"""bench.py's reuse of saved evaluations: only for the same settings, records and checkpoint."""

from __future__ import annotations

from omegaconf import OmegaConf

from metaedit.bench import _same_eval
from metaedit.data.records import digest
from metaedit.editors.io import editor_digest, save_editor


def test_saved_evaluation_is_reused_only_for_same_records_and_checkpoint(tmp_path, make_editor):
    directory = tmp_path / "ft"
    save_editor(make_editor("ft", steps=0), directory)
    cfg = OmegaConf.create({"data": {"name": "worldfacts"}, "split": "test", "limit": 5, "fluency_tokens": 0})
    records = digest([{"case_id": "capital:France"}])
    report = {"data": "worldfacts", "split": "test", "limit": 5, "fluency_tokens": 0, "records_digest": records,
              "editor_digest": editor_digest(directory), "metrics": {"fwd_bwd_ms": 1.0}}
    assert _same_eval(report, cfg, records, directory)
    # Other records (e.g. the split rebuilt in another order) or another limit: measure again.
    assert not _same_eval(report, cfg, digest([{"case_id": "capital:Spain"}]), directory)
    assert not _same_eval(report, OmegaConf.merge(cfg, {"limit": 6}), records, directory)
    # The checkpoint was replaced since (here: other hyper-parameters): measure again.
    save_editor(make_editor("ft", steps=3), directory)
    assert not _same_eval(report, cfg, records, directory)
