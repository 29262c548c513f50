"""python evaluate.py editor=checkpoints/<run_name> data=synthetic split=test"""

import sys

import hydra
from omegaconf import DictConfig

from metaedit.types import MetaEditError


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from metaedit.evaluation import run_evaluation

    try:
        run_evaluation(cfg)
    except MetaEditError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
