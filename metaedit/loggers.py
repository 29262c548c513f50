"""Experiment loggers; W&B goes offline by itself when the user is not logged in."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(project: str, name: str, save_dir: str, mode: str = "auto", **kwargs: Any) -> Any:
    """mode: auto (online if logged in, else offline — sync later with `wandb sync`), online, offline."""
    from pytorch_lightning.loggers import WandbLogger

    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.mode must be auto, online or offline, got {mode!r}")
    offline = mode == "offline" or (mode == "auto" and not wandb_logged_in())
    if offline:
        log.info("W&B: not logged in (or mode=offline); logging offline to %s — upload with `wandb sync`", save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, name=name, save_dir=save_dir, offline=offline, **kwargs)
