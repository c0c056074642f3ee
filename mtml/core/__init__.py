"""The method: loss terms, the cohort, its training step and its loop (checkpoints, the teacher
tape, live curves and DDP hooks come in as callbacks from runs/ and teach/). The core imports
no task, no run bookkeeping and no teaching module: networks and losses come from the task."""
