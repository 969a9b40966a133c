"""slimtune: fine-tune large language models on the hardware you have.

The Python API mirrors the CLI:

    import slimtune
    cfg = slimtune.load_config("examples/extract.yaml", overrides=["train.max_steps=20"])
    result = slimtune.finetune(cfg)                 # writes adapter files, metrics, eval.json
    model, tok = slimtune.load_run(result.output)  # base model + trained adapter
    print(slimtune.generate(model, tok, "Extract ..."))
    slimtune.merge_run(result.output, "out/merged")

`slimtune.train` is the subpackage that holds the training loop; the entry point is `finetune`.
"""

from slimtune.config import Config, load_config
from slimtune.errors import SlimtuneError
from slimtune.api import evaluate_run, finetune, generate, load_run, merge_run
from slimtune.combine import combine_adapters
from slimtune.routing import route

__all__ = ["Config", "SlimtuneError", "combine_adapters", "evaluate_run", "finetune", "generate", "load_config",
           "load_run", "merge_run", "route"]
__version__ = "0.1.0"
