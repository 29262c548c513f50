"""python train.py method=mend model=tiny-gpt2 data=synthetic [overrides...]"""

import sys

import hydra
from omegaconf import DictConfig

from metaedit.types import MetaEditError


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from metaedit.training import train

    try:
        train(cfg)
    except MetaEditError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
