"""The method: loss terms, the cohort, its training step and its loop (checkpoints, the teacher
tape, live curves and DDP hooks come in as callbacks from runs/ and teach/).

Still to untangle (issue 29): the cohort builds its default networks from tasks/models, and
features/stacking know the kit's network classes (tasks/models, tasks/detectors)."""
