"""python evaluate.py editor=checkpoints/<run_name> data=synthetic split=test"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from metaedit.cli import run_or_exit
    from metaedit.evaluation import run_evaluation

    run_or_exit(run_evaluation, cfg)


if __name__ == "__main__":
    main()
