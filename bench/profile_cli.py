"""A cProfile of one `verlite sft` launch, from the first import on: where a cold launch's
seconds go (imports, data, model loading, the first steps). `python -m cProfile -m verlite.cli`
would never write its output, because the CLI leaves with os._exit once the run is done
(cli.run_and_exit), so this calls the CLI's main() under the profiler and prints the stats.

    python bench/profile_cli.py OUT.prof sft data.train_files=... trainer.total_training_steps=12
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    profiler = cProfile.Profile()
    profiler.enable()
    from verlite.cli import main as cli_main  # imports are part of what a launch pays

    code = cli_main(argv)
    profiler.disable()
    profiler.dump_stats(out)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(90)
    stats.sort_stats("tottime").print_stats(50)
    print(text.getvalue())
    return code


if __name__ == "__main__":
    sys.exit(main())
