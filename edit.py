"""python edit.py editor=checkpoints/<run> prompt="The capital of France is" target="Rome" """

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="edit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from metaedit.cli import run_or_exit
    from metaedit.editing import run_edit

    run_or_exit(run_edit, cfg)


if __name__ == "__main__":
    main()
