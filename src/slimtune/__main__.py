"""`python -m slimtune ...` (what torchrun starts: `torchrun --nproc_per_node=N -m slimtune train CONFIG`)."""

from slimtune.cli import main

main()
